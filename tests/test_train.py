"""train.py: real training runs, in subprocesses exactly as a user launches them.

The runs train a tiny GPT-2 (2 layers, width 64) on token shards the tests write with token_data's `write_shard`.
One reference run is shared: the loss-falls, kill-and-resume, two-process, compile, bf16 and export tests all
compare against it. Only the Hub is a stand-in (a fake `HfApi` at the network boundary); the rest is the real code.
GPU tests (marked `gpu`) run the CUDA defaults (bf16, compile, fused AdamW, TF32) and skip on CPU.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpointing as ckpt
from cli import ConfigError
from synthetic import hellaswag_examples, learnable_tokens, write_jsonl
from token_data import write_shard
from train_config import load_config, parse_args

ROOT = Path(__file__).resolve().parents[1]


MAX_STEPS = 16


TINY_ARGS = [
    "--config",
    str(ROOT / "configs" / "tiny.yaml"),
    "--n_layer",
    "2",
    "--n_head",
    "4",
    "--n_embd",
    "64",
    "--n_positions",
    "64",
    "--seq_len",
    "32",
    "--micro_batch_size",
    "4",
    "--total_batch_tokens",
    "256",
    "--max_steps",
    str(MAX_STEPS),
    "--warmup_steps",
    "2",
    "--max_lr",
    "1e-2",
    "--min_lr",
    "1e-3",
    "--eval_every",
    "4",
    "--checkpoint_every",
    "4",
    "--keep_last",
    "2",
    "--val_tokens",
    "1024",
    "--eval_batch_size",
    "8",
    "--hellaswag_limit",
    "6",
    "--num_samples",
    "1",
    "--sample_tokens",
    "8",
]


def test_auto_precision_and_compile_follow_the_device_and_the_launch_config():
    from train import precision_and_compile

    auto = load_config(ROOT / "configs" / "gpt2_124m.yaml")
    unset = {
        "ACCELERATE_MIXED_PRECISION": "no",
        "ACCELERATE_DYNAMO_BACKEND": "NO",
    }  # a bare `accelerate launch`
    assert precision_and_compile(auto, cuda=True, env=unset) == ("bf16", "inductor")
    assert precision_and_compile(auto, cuda=True, env={}) == ("bf16", "inductor")
    assert precision_and_compile(auto, cuda=False, env=unset) == ("no", "no")
    chosen = {
        "ACCELERATE_MIXED_PRECISION": "fp16",
        "ACCELERATE_DYNAMO_BACKEND": "EAGER",
    }  # an accelerate config
    assert precision_and_compile(auto, cuda=True, env=chosen) == ("fp16", "eager")
    explicit = parse_args(["--mixed_precision", "no", "--compile", "false"])
    assert precision_and_compile(explicit, cuda=True, env={}) == ("no", "no")
    assert precision_and_compile(parse_args(["--compile", "true"]), cuda=False, env={}) == (
        "no",
        "inductor",
    )


def _env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE"))
    }
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _train(args: list[str], out: Path, launcher: list[str] | None = None, timeout=300, **env):
    cmd = (launcher or [sys.executable]) + [
        str(ROOT / "train.py"),
        *TINY_ARGS,
        *args,
        "--output_dir",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(run: Path) -> tuple[dict[int, float], dict[int, dict]]:
    """(step -> training loss, step -> evaluation line) from metrics.jsonl; fails on duplicate steps."""
    losses, evals = {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            assert row["step"] not in losses, f"step {row['step']} logged twice"
            losses[row["step"]] = row["loss"]
        else:
            assert row["step"] not in evals, f"evaluation at step {row['step']} logged twice"
            evals[row["step"]] = row
    return losses, evals


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, gpt2_encoding):
    """Train/val shards of structured token ids (a random Markov chain over 200 GPT-2 ids: learnable)."""
    folder = tmp_path_factory.mktemp("shards")
    tokens = learnable_tokens(30000)
    write_shard(folder / "test_val_000000.bin", tokens[:4096])
    write_shard(folder / "test_train_000001.bin", tokens[4096:])
    return folder


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    return write_jsonl(
        tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl", hellaswag_examples(6)
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, hellaswag_file):
    """One uninterrupted single-process run: MAX_STEPS optimizer steps of 2 x 4 x 32 tokens."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _train(["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)], out)
    return out, proc


@pytest.mark.slow
def test_a_short_run_learns_and_logs_everything(reference):
    run, proc = reference
    losses, evals = _metrics(run)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[MAX_STEPS] < losses[1] - 2.0, losses  # from ~10.8 (uniform over 50257) down
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "tokens"} <= first.keys()
    assert first["tokens"] == 256 and first["lr"] == pytest.approx(1e-2 / 2)
    assert sorted(evals) == [4, 8, 12, 16]
    assert evals[16]["val_loss"] < evals[4]["val_loss"]
    assert (
        0.0 <= evals[16]["hellaswag_acc_norm"] <= 1.0
    )  # the in-loop HellaSwag ran on the test file
    assert "--- sample 0 at step 16:\nHello, I'm a language model," in proc.stdout + proc.stderr
    # Run folder: resolved config, facts, trackers, rotated checkpoints, exports.
    assert (run / "config.yaml").is_file() and load_config(
        run / "config.yaml"
    ).optim.max_steps == MAX_STEPS
    info = json.loads((run / "run_info.json").read_text())
    assert info["grad_accum_steps"] == 2 and info["versions"]["accelerate"] and "hardware" in info
    assert "git_commit" in info
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]
    state = ckpt.read_trainer_state(run / "checkpoints" / "step_00000016")
    assert state["step"] == MAX_STEPS and state["tokens_seen"] == MAX_STEPS * 256
    card = (run / "export" / "README.md").read_text()
    assert (
        "step 16" in card
        and f"{evals[16]['val_loss']:.4f}" in card
        and "trust_remote_code=True" in card
    )


@pytest.mark.slow
def test_export_folders_load_with_auto_classes(reference, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    import evaluate_gpt2
    import modeling_gpt2_repro  # noqa: F401  (registers the Auto classes in this process)

    run, _ = reference
    ours = AutoModelForCausalLM.from_pretrained(run / "export", dtype=torch.float32)
    stock = AutoModelForCausalLM.from_pretrained(run / "export-gpt2", dtype=torch.float32)
    assert type(ours).__name__ == "GPT2ReproForCausalLM" and isinstance(stock, GPT2LMHeadModel)
    tok = AutoTokenizer.from_pretrained(run / "export")
    ids = tok("Hello, I'm a language model,", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits[..., :50257], stock(ids).logits, atol=1e-4)
        out = ours.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, stock.generate(ids, max_new_tokens=8, do_sample=False))
    assert out.shape[1] == ids.shape[1] + 8 and tok.decode(out[0]).startswith(
        "Hello, I'm a language model,"
    )
    # The export holds the final weights: its validation loss is the one logged at the last step.
    _, evals = _metrics(run)
    val = evaluate_gpt2.validation_loss(ours, data_dir, val_tokens=1024, batch_size=8, seq_len=32)
    assert val == pytest.approx(evals[MAX_STEPS]["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_export_loads_with_trust_remote_code_in_a_fresh_process(reference, tmp_path):
    run, _ = reference
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"folder = {str(run / 'export')!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)\n"
        "tok = AutoTokenizer.from_pretrained(folder)\n"
        "ids = tok('Hello, I', return_tensors='pt').input_ids\n"
        "out = model.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "assert 'modeling_gpt2_repro' not in sys.modules  # the project's module was never imported\n"
        "print(type(model).__module__, out.shape[1] - ids.shape[1])\n"
    )
    env = _env(
        PYTHONPATH=""
    )  # the fresh process cannot import the project: it must use the folder's code
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, new_tokens = proc.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and new_tokens == "5"


@pytest.mark.slow
def test_kill_at_an_arbitrary_step_then_resume_gives_identical_losses(
    reference, data_dir, hellaswag_file, tmp_path
):
    ref_losses, ref_evals = _metrics(reference[0])
    out = tmp_path / "run"
    args = [
        *TINY_ARGS,
        "--data_dir",
        str(data_dir),
        "--hellaswag_file",
        str(hellaswag_file),
        "--output_dir",
        str(out),
    ]
    kill_after = random.randint(5, 11)  # anywhere: mid-step, mid-evaluation or mid-checkpoint
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= kill_after:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count('"loss"')
    assert proc.returncode == -signal.SIGKILL and done < MAX_STEPS, (
        f"run ended before the kill ({done} steps)"
    )

    resumed = _train(
        [
            "--data_dir",
            str(data_dir),
            "--hellaswag_file",
            str(hellaswag_file),
            "--resume",
            "latest",
        ],
        out,
    )
    losses, evals = _metrics(out)
    assert losses == ref_losses, f"killed after step {kill_after}"  # bit-identical, fp32 on CPU
    assert {s: e["val_loss"] for s, e in evals.items()} == {
        s: e["val_loss"] for s, e in ref_evals.items()
    }
    assert (
        "resumed from step" in resumed.stdout + resumed.stderr
    )  # checkpoint 4 was whole before step 5 began
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 16]
    assert not list((out / "checkpoints").glob(".*")), "temporary checkpoint folders left behind"


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(
    reference, data_dir, hellaswag_file, tmp_path
):
    """torchrun + gloo: 2 processes x 1 micro-step of 4 x 32 = 1 process x 2 micro-steps, same windows."""
    ref_losses, ref_evals = _metrics(reference[0])
    out = tmp_path / "run"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    _train(
        ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)],
        out,
        launcher,
        ACCELERATE_USE_CPU="true",
    )
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["grad_accum_steps"] == 1
    losses, evals = _metrics(out)
    assert sorted(losses) == sorted(ref_losses)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
    for step, row in ref_evals.items():
        assert evals[step]["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)
        assert evals[step]["hellaswag_acc_norm"] == row["hellaswag_acc_norm"]
    assert sorted(
        p.name for p in (out / "checkpoints" / "step_00000016").glob("loader_rank*.json")
    ) == [
        "loader_rank0.json",
        "loader_rank1.json",
    ]


def test_missing_data_is_reported_before_anything_starts(tmp_path):
    import train

    with pytest.raises(ConfigError, match="no training shards in data_dir=.*python data_prep.py"):
        train.main(["--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(reference, data_dir):
    run, _ = reference
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY_ARGS,
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(run),
    ]
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert (
        again.returncode == 2
        and "already holds checkpoints" in again.stderr
        and "--resume latest" in again.stderr
    )
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]
    assert len(_metrics(run)[0]) == MAX_STEPS


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="inductor needs a C++ compiler",
)
def test_compiled_training_evaluates_samples_and_exports(
    reference, data_dir, hellaswag_file, tmp_path
):
    """torch.compile (inductor, here on CPU): same losses as eager, and evaluation, sampling and export work."""
    ref_losses, ref_evals = _metrics(reference[0])
    out = tmp_path / "run"
    proc = _train(
        ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file), "--compile", "true"],
        out,
    )
    assert json.loads((out / "run_info.json").read_text())["compile"] == "INDUCTOR"
    losses, evals = _metrics(out)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step
    assert evals[MAX_STEPS]["val_loss"] == pytest.approx(ref_evals[MAX_STEPS]["val_loss"], rel=1e-4)
    assert "hellaswag_acc_norm" in evals[MAX_STEPS]
    assert "--- sample 0 at step 16:\nHello, I'm a language model," in proc.stdout + proc.stderr
    from safetensors.torch import load_file

    names = list(load_file(out / "export" / "model.safetensors"))
    assert "lm_head.weight" in names or "transformer.wte.weight" in names
    assert not [k for k in names if "_orig_mod" in k]  # clean names, not the compile wrapper's


def _check_mixed_precision_run(
    run: Path, proc, reference_run: Path, device: str, steps: int
) -> None:
    """A bf16 run of `steps` steps: the CUDA defaults (or CPU autocast) were in force, it tracks the fp32
    reference while their LRs agree, it learns, evaluation, sampling and both exports work, and the exported
    weights are the fp32 master weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    info = json.loads((run / "run_info.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["device"].startswith(device)
    ref_losses, ref_evals = _metrics(reference_run)
    losses, evals = _metrics(run)
    assert sorted(losses) == list(range(1, steps + 1))
    same_lr = (
        range(1, steps + 1) if steps == MAX_STEPS else range(1, 3)
    )  # the warmup ignores max_steps
    for step in same_lr:  # bf16 rounding, not a different computation
        assert losses[step] == pytest.approx(ref_losses[step], rel=0.03), step
    assert losses[steps] < losses[1] - 1.0
    assert (
        evals[steps]["val_loss"] < ref_evals[4]["val_loss"] + 1.0
        and "hellaswag_acc_norm" in evals[steps]
    )
    assert (
        f"--- sample 0 at step {steps}:\nHello, I'm a language model," in proc.stdout + proc.stderr
    )
    weights = load_file(run / "export" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    for folder in ("export", "export-gpt2"):
        model = AutoModelForCausalLM.from_pretrained(run / folder, trust_remote_code=True)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits[..., :50257]).all()


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_evaluates_samples_and_exports(
    reference, data_dir, hellaswag_file, tmp_path
):
    """The GPU default mixed precision, run on the CPU's bf16 autocast so its code paths run in CI too."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)]
    short = [
        "--max_steps",
        "6",
        "--eval_every",
        "6",
        "--checkpoint_every",
        "6",
    ]  # bf16 is slow on CPUs
    proc = _train([*args, *short, "--mixed_precision", "bf16"], out)
    _check_mixed_precision_run(out, proc, reference[0], "cpu", steps=6)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_defaults_bf16_compile_fused_adamw(reference, data_dir, hellaswag_file, tmp_path):
    """On a GPU, the defaults: bf16 autocast, torch.compile, TF32, fused AdamW; evaluation, sampling, exports."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)]
    proc = _train(args, out, timeout=600)
    info = json.loads((out / "run_info.json").read_text())
    assert info["compile"] == "INDUCTOR" and info["optimizer_fused"] is True
    _check_mixed_precision_run(out, proc, reference[0], "cuda", steps=MAX_STEPS)


@pytest.mark.slow
def test_push_to_hub_uploads_the_export_in_the_background(data_dir, tmp_path):
    """The real trainer with the real uploader; only HfApi (the network) is replaced by a recording fake."""
    token = "hf_" + "NeverPrintMe0123456789"
    record = tmp_path / "hub.json"
    runner = tmp_path / "run_with_fake_hub.py"
    runner.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "import hub, train\n"
        "calls = []\n"
        "class FakeHfApi:\n"
        "    def create_repo(self, repo_id, **kw):\n"
        "        calls.append(['create_repo', repo_id, kw])\n"
        "    def upload_folder(self, repo_id, folder_path, commit_message, **kw):\n"
        "        files = sorted(p.name for p in Path(folder_path).iterdir())\n"
        "        calls.append(['upload_folder', repo_id, commit_message, files])\n"
        "hub.HfApi = FakeHfApi\n"
        "train.main(sys.argv[1:])\n"
        f"Path({str(record)!r}).write_text(json.dumps(calls))\n"
    )
    out = tmp_path / "run"
    args = [
        *TINY_ARGS,
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--checkpoint_every",
        "2",
        "--hellaswag",
        "false",
        "--push_to_hub",
        "me/gpt2-tiny",
        "--hub_private",
        "true",
    ]
    proc = subprocess.run(
        [sys.executable, str(runner), *args],
        cwd=tmp_path,
        env=_env(HF_TOKEN=token),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert token not in proc.stdout + proc.stderr
    calls = json.loads(record.read_text())
    assert calls[0] == [
        "create_repo",
        "me/gpt2-tiny",
        {"repo_type": "model", "private": True, "exist_ok": True},
    ]
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert (
        uploads[-1][2] == "step 4"
    )  # the final export always goes up (step 2's may be superseded)
    for c in uploads:
        assert {
            "config.json",
            "model.safetensors",
            "modeling_gpt2_repro.py",
            "README.md",
            "tokenizer.json",
        } <= set(c[3])
    assert "me/gpt2-tiny" in (out / "export" / "README.md").read_text()
    assert not list((out / ".hub-staging").iterdir())


@pytest.mark.slow
def test_gpu_bench_script_runs_on_cpu_with_tiny():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_bench.py"),
            "--tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("tokens/s:", "MFU:", "peak memory:", "B=4 T=64"):
        assert line in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Training from a text stream (--dataset): a multi-file parquet stream of ~5,500 tokens (conftest.stream_files)

STREAM = [
    "--stream_val_tokens",
    "2048",
    "--stream_shard_tokens",
    "1000",
    "--stream_batch_docs",
    "4",
]
QUICK = [
    "--hellaswag",
    "false",
    "--num_samples",
    "0",
    "--shuffle",
    "false",
]  # 16 steps: into epoch 2


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, stream_files):
    """One uninterrupted run straight from the stream, shuffle off."""
    out = tmp_path_factory.mktemp("streamed") / "run"
    _train(["--dataset", str(stream_files[0]), *STREAM, *QUICK], out)
    return out


@pytest.mark.slow
def test_streamed_training_equals_training_on_shards_of_the_same_source(
    streamed, stream_files, tmp_path
):
    """data_prep.py with the same settings, then train on its shards: the same losses and validation losses."""
    import data_prep

    shards = tmp_path / "shards"
    prep = data_prep.PrepConfig(
        dataset=str(stream_files[0]), output_dir=str(shards), val_tokens=2048, shard_tokens=1000
    )
    data_prep.prepare(prep)
    _train(["--data_dir", str(shards), *QUICK], tmp_path / "run")
    losses, evals = _metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert _metrics(streamed) == (
        losses,
        evals,
    )  # bit-identical: the same windows in the same order
    config = load_config(streamed / "config.yaml")
    assert config.data.dataset == str(stream_files[0]) and config.data.stream_val_tokens == 2048
    state = json.loads(
        (streamed / "checkpoints" / "step_00000016" / "loader_rank0.json").read_text()
    )
    assert state["epoch"] == 1 and state["dataset_state"] is not None


@pytest.mark.slow
def test_streamed_training_resumes_exactly_after_sigkill(streamed, stream_files, tmp_path):
    out = tmp_path / "run"
    args = [
        *TINY_ARGS,
        "--dataset",
        str(stream_files[0]),
        *STREAM,
        *QUICK,
        "--output_dir",
        str(out),
    ]
    kill_after = random.randint(5, 11)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= kill_after:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert metrics.read_text().count('"loss"') < MAX_STEPS, "the run ended before the kill"
    resumed = _train(
        ["--dataset", str(stream_files[0]), *STREAM, *QUICK, "--resume", "latest"], out
    )
    assert "resumed from step" in resumed.stdout + resumed.stderr
    assert _metrics(out) == _metrics(streamed), f"killed after step {kill_after}"


@pytest.mark.slow
def test_a_failing_stream_stops_with_one_error_line_and_resumes(streamed, stream_files, tmp_path):
    """From some point on, every read of one file fails (a stand-in for a network outage, installed in the
    training process): the run stops with exit code 2 and an `error:` line after its retries, its checkpoints
    whole; once reads work, --resume latest finishes with the losses of a run that never failed."""
    runner = tmp_path / "train_with_a_broken_file.py"
    runner.write_text(
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from synthetic import FlakyReads\n"
        "FlakyReads('part_022', failures=10**9).install()\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
    )
    out = tmp_path / "run"
    args = ["--dataset", str(stream_files[0]), *STREAM, *QUICK, "--output_dir", str(out)]
    proc = subprocess.run(
        [sys.executable, str(runner), *TINY_ARGS, *args, "--stream_retries", "1"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = errors[0]
    assert error.startswith("error: Reading the dataset failed 2 times in a row")
    assert "ConnectionResetError" in error and "--resume latest" in error
    done = len(_metrics(out)[0])
    saved = [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]
    assert 4 <= done < MAX_STEPS and saved and max(saved) <= done, (done, saved)
    assert not list((out / "checkpoints").glob(".*")), "a half-written checkpoint was left"
    _train([*args[:-2], "--resume", "latest"], out)
    assert _metrics(out) == _metrics(streamed)


@pytest.mark.slow
def test_two_processes_read_disjoint_parts_of_the_stream(gpt2_encoding, stream_files, tmp_path):
    """torchrun + gloo: train.py's own loader in each process serves that process's documents, cut as the layout
    says (synthetic.reference_windows): no window read twice, none skipped."""
    from synthetic import reference_windows

    script = tmp_path / "serve.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "import numpy as np, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        "cfg = train.parse_args(sys.argv[1:])\n"
        "accelerator = train.make_accelerator(cfg, Path(cfg.run.output_dir))\n"
        "loader = train.make_loader(cfg, accelerator)\n"
        "windows = [torch.cat([x, y[:, -1:]], 1) for x, y in (loader.next_batch() for _ in range(16))]\n"
        "out = Path(cfg.run.output_dir) / f'rank{accelerator.process_index}.npy'\n"
        "np.save(out, torch.cat(windows).numpy())\n"
        "loader.close()\n"
    )
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    args = [
        *TINY_ARGS,
        "--dataset",
        str(stream_files[0]),
        *STREAM,
        *QUICK,
        "--output_dir",
        str(tmp_path),
    ]
    proc = subprocess.run(
        [*launcher, str(script), *args],
        cwd=tmp_path,
        env=_env(ACCELERATE_USE_CPU="true"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, texts = stream_files
    served = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    for rank in range(2):
        expected = reference_windows(gpt2_encoding, texts, 2048, 1000, 32, rank, world_size=2)
        assert len(expected) < len(served[rank]) < 2 * len(expected)  # an epoch and then some
        assert np.array_equal(served[rank][: len(expected)], expected), rank
        assert np.array_equal(
            served[rank][len(expected) :], expected[: len(served[rank]) - len(expected)]
        )
    assert not {bytes(w) for w in served[0]} & {bytes(w) for w in served[1]}
