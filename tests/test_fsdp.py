"""Training under FSDP2: the evaluation (validation loss, HellaSwag, samples), the optimizer step's gradient norm, the
checkpoint's gathered weights and the check for non-finite weights, run by the functions train.py calls on a model
sharded over two processes, against the same weights whole in one process.

accelerate runs FSDP on GPUs only, so tests/fsdp_worker.py shards the model with accelerate's own FSDP2 function
(fsdp2_prepare_model: torch's fully_shard as README's FSDP config asks) in CPU processes joined over gloo by torchrun.
Through `accelerate launch` itself, FSDP runs in the gpu tests below (and in bench/gpu_checks.sh).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from runs import MAX_STEPS, ROOT, TORCHRUN, read_metrics, run_env, run_training

WORKER = ROOT / "tests" / "fsdp_worker.py"
SPLIT_TOLERANCE = 1e-4  # two steps on split batches: AdamW's first steps are sign-like where gradients are tiny, so
# the all-reduce's other summation order moves such weights by up to 4e-5 (measured); the losses stay within 1e-7


@pytest.fixture(scope="module")
def fsdp_record(tmp_path_factory, gpt2_encoding):
    """The worker's record: each step's figures on the sharded model and on the whole one."""
    out = tmp_path_factory.mktemp("fsdp") / "record.pt"
    env = {k: v for k, v in run_env().items() if not k.startswith("LOCAL_")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [*TORCHRUN, str(WORKER), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_evaluation_of_a_sharded_model_equals_one_process_on_the_same_weights(fsdp_record):
    """periodic_eval.Evaluator on the model FSDP2 shards over two processes (each process evaluating its share,
    padded to the same number of forwards): the validation loss of one process holding the same weights to 1e-6,
    the same HellaSwag scores, every process sampling the same text as one process does; before any training
    step (as a resumed run may evaluate first) and after two. Then the model holds its shards again."""
    assert fsdp_record["types"] == ("FSDPGPT2ReproForCausalLM", "DTensor")  # sharded, as accelerate shards it
    for step in ("step0", "step2"):
        sharded, alone = fsdp_record[step]
        result = sharded["result"]
        assert result.val_loss == pytest.approx(alone["val_loss"], rel=1e-6, abs=0), step
        assert (result.hellaswag_acc_norm, result.hellaswag_acc) == (alone["acc_norm"], alone["acc"]), step
        assert result.hellaswag_examples == 7
        samples = fsdp_record[f"{step}_samples"]
        assert len(samples) == 2 and all(s.startswith("Hello, I'm a language model,") for s in samples)
        assert sharded["samples"] == [samples, samples], step  # both processes sampled what one process does
        assert sharded["logged"] == [f"--- sample {i} at step {step[-1]}:\n{s}" for i, s in enumerate(samples)]
    # no gathered copy left behind, by the whole evaluation nor by the validation kernel alone
    assert fsdp_record["resharded"] == {"evaluation": ["DTensor"], "validation_loss": ["DTensor"]}


@pytest.mark.slow
def test_a_sharded_step_reports_the_gradient_norm_of_the_whole_batch(fsdp_record):
    """train_step on the sharded model, each process on its half of the batch (the gradient norm: FSDP2's DTensor,
    made whole), against the whole model on the whole batch: the same loss and norm, the same weights after."""
    sharded, whole = fsdp_record["train"]
    assert sharded[0] == whole[0]  # the first step: the same weights, the same numbers exactly
    for (loss, norm, skipped), (want_loss, want_norm, _) in zip(sharded, whole, strict=True):
        assert loss == pytest.approx(want_loss, rel=1e-6) and norm == pytest.approx(want_norm, rel=1e-4)
        assert not skipped
    gathered, alone = fsdp_record["weights"]
    assert max((gathered[n] - alone[n]).abs().max().item() for n in alone) <= SPLIT_TOLERANCE


@pytest.mark.slow
def test_the_checkpoint_of_a_sharded_model_holds_the_whole_weights(fsdp_record):
    """The weights gathered as a checkpoint gathers them under FSDP2, written by save_model_files: a model folder
    that from_pretrained loads with exactly the sharded model's weights, and its stock GPT-2 export beside it."""
    from transformers import GPT2LMHeadModel

    gathered, _ = fsdp_record["weights"]
    loaded = fsdp_record["loaded"]
    assert loaded.keys() == gathered.keys() and all(torch.equal(loaded[n], gathered[n]) for n in gathered)
    folder = Path(fsdp_record["checkpoint"])
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["GPT2ReproForCausalLM"]
    assert type(GPT2LMHeadModel.from_pretrained(folder / "export-gpt2")) is GPT2LMHeadModel


@pytest.mark.slow
def test_a_nan_in_one_process_shard_is_found_by_every_process(fsdp_record):
    """nonfinite_parameters checks each process's own shards; the count summed over processes (as the checkpoint
    guard sums it) tells every process."""
    first, second = fsdp_record["nonfinite"]
    assert first == ([], 1.0) and second == (["transformer.h.0.mlp.c_fc.weight"], 1.0)


# ------------------------------------------------------------------------------- through accelerate, on a GPU


def _fsdp_config(folder: Path) -> Path:
    """README's FSDP variant of accelerate_config.yaml, for one process."""
    text = (ROOT / "accelerate_config.yaml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith(("distributed_type:", "num_processes:"))]
    lines += [
        "distributed_type: FSDP",
        "num_processes: 1",
        "fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, "
        "fsdp_transformer_layer_cls_to_wrap: GPT2ReproBlock, fsdp_state_dict_type: SHARDED_STATE_DICT}",
    ]
    path = folder / "accelerate_fsdp.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.gpu
@pytest.mark.slow
def test_fsdp_training_through_accelerate_evaluates_samples_and_resumes(reference, data_dir, hellaswag_file, tmp_path):
    """`accelerate launch` with README's FSDP config (one GPU): the periodic evaluation runs (validation loss,
    HellaSwag, samples), in fp32 without TF32 close to the CPU reference's, and a resume continues it."""
    accelerate = shutil.which("accelerate") or pytest.skip("the accelerate command is not installed")
    launcher = [accelerate, "launch", "--config_file", str(_fsdp_config(tmp_path))]
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)]
    args += ["--mixed_precision", "no", "--tf32", "false", "--compile", "false"]
    proc = run_training([*args, "--max_steps", "12"], out, launcher, timeout=600)
    assert "no evaluation during FSDP" not in proc.stdout + proc.stderr
    resumed = run_training([*args, "--resume", "latest"], out, launcher, timeout=600)
    output = proc.stdout + proc.stderr + resumed.stdout + resumed.stderr
    losses, evals = read_metrics(out)
    ref_losses, ref_evals = read_metrics(reference[0])
    assert sorted(evals) == [4, 8, 12, 16] and sorted(losses) == list(range(1, MAX_STEPS + 1))
    for step, row in evals.items():  # a GPU's fp32 against the CPU's: summation order only
        assert row["val_loss"] == pytest.approx(ref_evals[step]["val_loss"], rel=1e-3), step
        assert "hellaswag_acc_norm" in row
    assert "--- sample 0 at step 16:\nHello, I'm a language model," in output
    assert (out / "checkpoints" / "step_00000016" / "pytorch_model_fsdp_0").is_dir()
    info = json.loads((out / "run_info.json").read_text())
    assert info["device"].startswith("cuda") and os.path.isdir(out / "export")
