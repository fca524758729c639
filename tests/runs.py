"""Training runs for the tests: the tiny run's options, running train.py as a user does (in the foreground or
the background), and reading what a run leaves (metrics, checkpoints, messages)."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from gpt2_repro.checkpointing import folders as ckpt

ROOT = Path(__file__).resolve().parents[1]


def shared_folder(tmp_path_factory, name: str, make) -> Path:
    """A folder made once per test session, also when pytest-xdist runs the tests in several processes: the first
    process that asks for it makes it, under a file lock, and the others wait and reuse it. `make(folder)` fills
    the folder; tests only read it (a test that changes a run works on a copy)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each process's own
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            done.touch()
    return folder


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
    "512",
    "--eval_batch_size",
    "8",
    "--hellaswag_limit",
    "6",
    "--num_samples",
    "1",
    "--sample_tokens",
    "8",
    "--cpu_threads",
    "1",
]


def run_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "HF_TOKEN"))}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    return env


def run_training(args: list[str], out: Path, launcher: list[str] | None = None, timeout=300, umask=None, **env):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *TINY_ARGS, *args, "--output_dir", str(out)]
    preexec = None if umask is None else (lambda: os.umask(umask))
    proc = subprocess.run(
        cmd, cwd=ROOT, env=run_env(**env), capture_output=True, text=True, timeout=timeout, preexec_fn=preexec
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_metrics(run: Path) -> tuple[dict[int, float], dict[int, dict]]:
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


def shared_run(tmp_path_factory, name: str, args: list[str], umask=None):
    """(run folder, its output) of one training run made once for the whole session (conftest.shared_folder)."""

    def make(folder):
        proc = run_training(args, folder / "run", umask=umask)
        (folder / "stdout.txt").write_text(proc.stdout)
        (folder / "stderr.txt").write_text(proc.stderr)

    folder = shared_folder(tmp_path_factory, name, make)
    output = SimpleNamespace(stdout=(folder / "stdout.txt").read_text(), stderr=(folder / "stderr.txt").read_text())
    return folder / "run", output


MUON_ARGS = ["--optimizer", "muon", "--schedule", "wsd", "--decay_fraction", "0.4"]


# Runs whose losses must be a reference run's: each recipe, and activation checkpointing, which changes no number.
RECIPES = {
    "adamw": ("reference", []),
    "muon": ("muon_reference", MUON_ARGS),
    "checkpointing": ("reference", ["--gradient_checkpointing"]),
}


def assert_refused_at_start(proc, out: Path, message: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert message in errors[0] and "--push_to_hub" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@contextlib.contextmanager
def training_in_background(args: list[str], out: Path, launcher: list[str] | None = None, **env):
    """A training run in the background (its own process group, killed whole if the test fails)."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *TINY_ARGS, *args, "--output_dir", str(out)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=run_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # Ctrl-C as in a terminal, also when pytest itself runs in the background (`nohup ... &` ignores SIGINT,
        # and an ignored signal stays ignored in every child)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a no-op when everything ended
        proc.communicate()


def wait_for_step(out: Path, step: int, proc, timeout: float = 240) -> None:
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= step:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run ended or stalled before step {step}")


def stopped_at(out: Path, output: str, tracebacks: int = 0) -> int:
    """The step a stop request saved: named in the message, the run's last step and its newest checkpoint.

    No traceback of train.py; torchrun's agent prints its own for the signal that reached it (not ours to change).
    """
    found = re.search(r"stopped at step (\d+) \(.*\): checkpoint (\S+) is complete", output)
    assert found, output[-3000:]
    step = int(found.group(1))
    assert max(read_metrics(out)[0]) == step  # the step it was on when it agreed to stop, not a later one
    assert ckpt.list_checkpoints(out / "checkpoints")[-1] == (step, Path(found.group(2)))
    assert not list((out / "checkpoints").glob(".*")), "temporary checkpoint folders left behind"
    assert output.count("Traceback") == output.count("SignalException: Process") + tracebacks, output[-3000:]
    return step


def expect_exit_2(proc_or_result, stderr: str | None = None) -> str:
    """Exit code 2 with exactly one `error:` line and no traceback; returns that line."""
    err = proc_or_result.stderr if stderr is None else stderr
    assert proc_or_result.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def run_unchecked(args: list[str], out: Path, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_ARGS, *args, "--output_dir", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300, **kw)


def finite_tensors(folder: Path) -> int:
    """Asserts that every tensor of every weights file and optimizer state under `folder` is finite; returns
    how many files it read."""
    from safetensors.torch import load_file

    weights, optimizers = list(folder.rglob("*.safetensors")), list(folder.rglob("optimizer.bin"))
    for f in weights:
        assert all(torch.isfinite(t).all() for t in load_file(f).values()), f
    for f in optimizers:
        moments = torch.load(f, weights_only=True)["state"].values()  # {param: {exp_avg, ...}}
        assert all(torch.isfinite(t).all() for m in moments for t in m.values()), f
    return len(weights) + len(optimizers)
