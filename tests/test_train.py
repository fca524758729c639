"""train.py: training runs that learn and log, on one process or two, compiled or in bf16, in subprocesses exactly as a
user launches them."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_repro.base.config import load_config
from gpt2_repro.checkpointing import folders as ckpt
from runs import MAX_STEPS, RECIPES, ROOT, read_metrics, run_env, run_training


@pytest.mark.slow
def test_a_short_run_learns_and_logs_everything(reference, hellaswag_file, gpt2_encoding):
    from gpt2_repro.evaluation.hellaswag import load_hellaswag
    from gpt2_repro.evaluation.scoring import score_hellaswag
    from modeling_gpt2_repro import GPT2ReproForCausalLM

    run, proc = reference
    losses, evals = read_metrics(run)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[MAX_STEPS] < losses[1] - 2.0, losses  # from ~10.8 (uniform over 50257) down
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "tokens"} <= first.keys()
    assert first["tokens"] == 256 and first["lr"] == pytest.approx(1e-2 / 2)
    assert sorted(evals) == [4, 8, 12, 16]
    assert evals[16]["val_loss"] < evals[4]["val_loss"]
    # The in-loop HellaSwag scored the test file's 6 examples with the step-16 weights, which the export holds.
    final = GPT2ReproForCausalLM.from_pretrained(run / "export").eval()
    want = score_hellaswag(final, gpt2_encoding, load_hellaswag(hellaswag_file, limit=6), batch_size=8)
    assert (evals[16]["hellaswag_acc_norm"], evals[16]["hellaswag_acc"]) == (want["acc_norm"], want["acc"])
    assert "mfu" not in first  # no peak FLOP/s known for a CPU: no MFU rather than a made-up one
    assert "--- sample 0 at step 16:\nHello, I'm a language model," in proc.stdout + proc.stderr
    assert "has no manifest.json, so its shards cannot be checked" in proc.stdout + proc.stderr  # shards from elsewhere
    # Run folder: resolved config, facts, trackers, rotated checkpoints, exports.
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").optim.max_steps == MAX_STEPS
    info = json.loads((run / "run_info.json").read_text())
    assert info["grad_accum_steps"] == 2 and info["versions"]["accelerate"] and "hardware" in info
    assert "git_commit" in info
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]
    state = ckpt.read_run_state(run / "checkpoints" / "step_00000016")
    assert state["step"] == MAX_STEPS and state["tokens_seen"] == MAX_STEPS * 256 and state["line"] == 1
    # trainer_state.json is transformers' own TrainerState, which tools that read Trainer checkpoints load
    from transformers import TrainerState

    trainer = TrainerState.load_from_json(str(run / "checkpoints" / "step_00000016" / "trainer_state.json"))
    assert trainer.global_step == MAX_STEPS and trainer.num_input_tokens_seen == MAX_STEPS * 256
    assert trainer.max_steps == MAX_STEPS and trainer.log_history[-1]["eval_loss"] == evals[16]["val_loss"]
    # its log_history is the run's history up to the checkpoint, training and evaluation, under Trainer's names
    history = trainer.log_history
    assert [e["step"] for e in history if "loss" in e] == list(range(1, MAX_STEPS + 1))
    assert [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e] == [
        (s, evals[s]["val_loss"]) for s in (4, 8, 12, 16)
    ]
    assert {k: history[0][k] for k in ("loss", "learning_rate", "grad_norm", "num_input_tokens_seen")} == {
        "loss": first["loss"],
        "learning_rate": first["lr"],
        "grad_norm": first["grad_norm"],
        "num_input_tokens_seen": 256,
    }
    assert "eval_hellaswag_acc_norm" in history[-1] and "val_loss" not in history[-1]
    older = TrainerState.load_from_json(str(run / "checkpoints" / "step_00000012" / "trainer_state.json"))
    assert max(e["step"] for e in older.log_history) == 12 and len(older.log_history) == 12 + 3
    # Trainer's own lookup of the newest checkpoint finds it in the run folder: checkpoint-16, a link to it
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-16")
    assert (run / "checkpoint-16").resolve() == (run / "checkpoints" / "step_00000016").resolve()
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-16"]  # the link moved on with each save
    card = (run / "export" / "README.md").read_text()
    assert "step 16" in card and f"{evals[16]['val_loss']:.4f}" in card and "trust_remote_code=True" in card


@pytest.mark.slow
def test_a_muon_run_learns_faster_and_exports_a_stock_gpt2(reference, muon_reference):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    losses, evals = read_metrics(muon_reference[0])
    ref_losses, ref_evals = read_metrics(reference[0])
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert evals[MAX_STEPS]["val_loss"] < ref_evals[MAX_STEPS]["val_loss"]  # on this learnable chain
    first = json.loads((muon_reference[0] / "metrics.jsonl").read_text().splitlines()[0])
    assert first["muon_lr"] == pytest.approx(0.02 / 2) and first["lr"] == pytest.approx(1e-2 / 2)
    from gpt2_repro import register_auto_classes

    register_auto_classes()
    ours = AutoModelForCausalLM.from_pretrained(muon_reference[0] / "export", dtype=torch.float32)
    stock = AutoModelForCausalLM.from_pretrained(muon_reference[0] / "export-gpt2", dtype=torch.float32)
    assert type(stock) is GPT2LMHeadModel and stock.config.model_type == "gpt2"
    ids = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11]])  # "Hello, I'm a language model,"
    with torch.no_grad():  # the stock export is the same model as ours, in GPT-2's own layout
        assert torch.allclose(ours(ids).logits[..., :50257], stock(ids).logits, atol=1e-4)
        out = ours.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, stock.generate(ids, max_new_tokens=8, do_sample=False))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_processes_match_one_process_with_the_same_global_batch(
    recipe, request, data_dir, hellaswag_file, tmp_path
):
    """torchrun + gloo: 2 processes x 1 micro-step of 4 x 32 = 1 process x 2 micro-steps, same windows.

    With Muon every process orthogonalizes the same all-reduced gradient: the same update everywhere. Activation
    checkpointing under DDP: the same losses as the reference without it."""
    fixture, recipe_args = RECIPES[recipe]
    ref_losses, ref_evals = read_metrics(request.getfixturevalue(fixture)[0])
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_training(
        [*recipe_args, "--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)],
        out,
        launcher,
        ACCELERATE_USE_CPU="true",
    )
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["grad_accum_steps"] == 1
    assert info["gradient_checkpointing"] is ("--gradient_checkpointing" in recipe_args)
    losses, evals = read_metrics(out)
    assert sorted(losses) == sorted(ref_losses)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
    for step, row in ref_evals.items():
        assert evals[step]["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)
        assert evals[step]["hellaswag_acc_norm"] == row["hellaswag_acc_norm"]
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000016").glob("loader_rank*.json")) == [
        "loader_rank0.json",
        "loader_rank1.json",
    ]


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor needs a C++ compiler")
def test_compiled_training_evaluates_samples_and_exports(reference, data_dir, hellaswag_file, tmp_path):
    """torch.compile (inductor, here on CPU): same losses as eager, and evaluation, sampling and export work."""
    ref_losses, ref_evals = read_metrics(reference[0])
    out = tmp_path / "run"
    proc = run_training(
        ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file), "--compile", "true"], out
    )
    assert json.loads((out / "run_info.json").read_text())["compile"] == "INDUCTOR"
    losses, evals = read_metrics(out)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step
    assert evals[MAX_STEPS]["val_loss"] == pytest.approx(ref_evals[MAX_STEPS]["val_loss"], rel=1e-4)
    assert "hellaswag_acc_norm" in evals[MAX_STEPS]
    assert "--- sample 0 at step 16:\nHello, I'm a language model," in proc.stdout + proc.stderr
    assert "has no manifest.json, so its shards cannot be checked" in proc.stdout + proc.stderr  # shards from elsewhere
    from safetensors.torch import load_file

    # Clean names, not the compile wrapper's: exactly the uncompiled run's, the tied LM head stored once as wte.
    names = set(load_file(out / "export" / "model.safetensors"))
    assert names == set(load_file(reference[0] / "export" / "model.safetensors"))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names


# bf16 autocast against the fp32 reference, the same 16 steps: measured on CPU (torch 2.13) at most 2.2e-4 relative
# on a step's loss (step 3) and 6.5e-6 on step 1's, computed before any update (the rounding of one forward pass); the
# bounds are 5x and 15x that. The GPU run (bf16, compile, TF32, fused AdamW) was not measured here: it keeps 3%.
BF16_NOISE = {"cpu": {"step 1": 1e-4, "steps": 1e-3}, "cuda": {"step 1": 0.03, "steps": 0.03}}
# Training FLOPs per token of TINY_ARGS' model (2 x 64, 4 heads, vocabulary 50,304, T 32): 6 N + 12 L H D T, N the
# matmul weights with the tied embedding, 12 L C^2 + 13 L C + V C + 2 C = 3,319,552 (nanoGPT's and PaLM's estimate).
TINY_FLOPS_PER_TOKEN = 6 * 3_319_552 + 12 * 2 * 4 * 16 * 32


def _check_mixed_precision_run(run: Path, proc, reference_run: Path, device: str, peak_tflops: float | None) -> None:
    """A bf16 run of MAX_STEPS steps: the CUDA defaults (or CPU autocast) were in force, every loss and validation
    loss is the fp32 reference's to within bf16's rounding (BF16_NOISE) but not bit for bit, evaluation, sampling and
    both exports work, the exported weights are the fp32 master weights, and metrics.jsonl has each step's MFU
    against `peak_tflops` (None: the known-GPU table's)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    info = json.loads((run / "run_info.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["device"].startswith(device)
    ref_losses, ref_evals = read_metrics(reference_run)
    losses, evals = read_metrics(run)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    noise = BF16_NOISE[device]
    assert losses[1] == pytest.approx(ref_losses[1], rel=noise["step 1"])
    for step, loss in ref_losses.items():  # bf16 rounding, not a different computation
        assert losses[step] == pytest.approx(loss, rel=noise["steps"]), step
    assert losses != ref_losses  # bf16 was in force: not the fp32 computation
    assert sorted(evals) == sorted(ref_evals)
    for step, row in ref_evals.items():
        assert evals[step]["val_loss"] == pytest.approx(row["val_loss"], rel=noise["steps"]), step
        assert "hellaswag_acc_norm" in evals[step]
    assert f"--- sample 0 at step {MAX_STEPS}:\nHello, I'm a language model," in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in (r for r in rows if "loss" in r):  # MFU: the model's FLOPs at the measured speed over the peak
        if peak_tflops is not None:
            assert row["mfu"] == pytest.approx(TINY_FLOPS_PER_TOKEN * row["tokens_per_sec"] / (peak_tflops * 1e12))
        else:
            assert 0 < row["mfu"] < 1
    weights = load_file(run / "export" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    for folder in ("export", "export-gpt2"):
        model = AutoModelForCausalLM.from_pretrained(run / folder, trust_remote_code=True)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits[..., :50257]).all()


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_evaluates_samples_and_exports(reference, data_dir, hellaswag_file, tmp_path):
    """The GPU default mixed precision, run on the CPU's bf16 autocast so its code paths run in CI too (as fast as
    fp32 for this tiny model), with a peak of 1 TFLOP/s so that metrics.jsonl gets an MFU on a CPU."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file), "--peak_tflops", "1"]
    proc = run_training([*args, "--mixed_precision", "bf16"], out)
    _check_mixed_precision_run(out, proc, reference[0], "cpu", peak_tflops=1.0)


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, data_dir, hellaswag_file):
    """(run folder, process) of a run with the CUDA defaults (made only by the gpu tests that ask for it)."""
    out = tmp_path_factory.mktemp("cuda") / "run"
    proc = run_training(["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)], out, timeout=600)
    return out, proc


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_defaults_bf16_compile_fused_adamw(reference, cuda_run):
    """On a GPU, the defaults: bf16 autocast, torch.compile, TF32, fused AdamW; evaluation, sampling, exports."""
    out, proc = cuda_run
    info = json.loads((out / "run_info.json").read_text())
    assert info["compile"] == "INDUCTOR" and info["optimizer_fused"] is True
    _check_mixed_precision_run(out, proc, reference[0], "cuda", peak_tflops=None)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_defaults_with_gradient_checkpointing(reference, cuda_run, data_dir, hellaswag_file, tmp_path):
    """--gradient_checkpointing with torch.compile, bf16 autocast and fused AdamW: the compiled blocks run again in
    the backward; the losses are the same run's without it, to the rounding of a differently fused bf16 graph
    (measured on CPU, compiled bf16, two steps: 8.2e-5 apart); evaluation, sampling and exports work."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file), "--gradient_checkpointing"]
    proc = run_training(args, out, timeout=600)
    info = json.loads((out / "run_info.json").read_text())
    assert info["compile"] == "INDUCTOR" and info["gradient_checkpointing"] is True
    losses, plain = read_metrics(out)[0], read_metrics(cuda_run[0])[0]
    for step in range(1, 5):
        assert losses[step] == pytest.approx(plain[step], rel=1e-3), step
    for step in range(5, MAX_STEPS + 1):  # bf16 differences grow through 16 steps at LR 1e-2
        assert losses[step] == pytest.approx(plain[step], rel=0.03), step
    _check_mixed_precision_run(out, proc, reference[0], "cuda", steps=MAX_STEPS)


@pytest.mark.slow
def test_gpu_bench_script_runs_on_cpu_with_tiny():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--steps", "2", "--warmup", "1"],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("tokens/s:", "MFU:", "peak memory:", "B=4 T=64"):
        assert line in proc.stdout
