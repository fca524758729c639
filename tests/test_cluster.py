"""Launches on several processes and machines, for real: two "machines" on localhost (one torchrun agent each,
`--nnodes 2`, gloo: tests/machines.py), the launches that would silently train as separate runs, and a stop under
a launcher's grace with other trainings on the cores.

The runs are the tiny test model of tests/runs.py (2 layers, width 64, 16 steps of 256 tokens), compared with the
one-process `reference` run (conftest.py).
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gpt2_repro.checkpointing import folders as ckpt
from machines import FSDP_TWO_PROCESSES_YAML, free_port, machines, wait_all, wait_for_step
from runs import MAX_STEPS, ROOT, TINY_ARGS, read_metrics, run_env

# The option that bounds how long a process waits for the others in a collective (the process group's timeout,
# accelerate's InitProcessGroupKwargs(timeout=...)); gloo's default is 30 minutes, NCCL's 10.
DIST_TIMEOUT_OPTION = "--dist_timeout"
# accelerate launch's single-process launcher kills train.py this long after passing SIGTERM on (accelerate 1.16).
ACCELERATE_GRACE_S = 5.0

QUIET = ["--hellaswag", "false", "--eval_every", "0", "--num_samples", "0", "--log_with", "none"]


def _args(data_dir, out: Path, *extra: str) -> list[str]:
    return [*TINY_ARGS, "--data_dir", str(data_dir), *QUIET, "--output_dir", str(out), *extra]


def _close(losses: dict[int, float], ref: dict[int, float], tol: float = 1e-6) -> None:
    """fp32 on CPU: the same global batch on one process or two machines gives the same losses."""
    assert losses, "no step logged"
    for step, loss in losses.items():
        assert loss == pytest.approx(ref[step], abs=tol, rel=0), (step, loss, ref[step])


def _worker_exit_codes(output: str) -> list[int]:
    """The exit codes torchrun reports for its workers (when one failed or stopped with a code other than 0)."""
    return [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", output)]


def _no_trainer_traceback(output: str) -> None:
    """The launcher prints its own report; train.py itself must not end with a traceback."""
    assert 'train.py", line' not in output, output[-4000:]


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output[-4000:]
    _no_trainer_traceback(output)
    return lines[0]


def _only_the_lock(run: Path) -> None:
    """Nothing written to the run folder but the lock (or not even the folder)."""
    if run.exists():
        written = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
        assert written in ([], [".lock"]), written


# ------------------------------------------------------------------------------------------ two machines


@pytest.mark.slow
def test_a_stop_reaches_every_machine_and_the_run_resumes_on_one_then_on_two(reference, data_dir, tmp_path):
    """Two torchrun agents (--nnodes 2 --node_rank 0/1, static rendezvous on 127.0.0.1), one process each. SIGTERM
    to one machine's launcher (the machine that does not host the rendezvous): every process stops at the same step
    with one complete checkpoint, and the other machine's worker exits 75. The run continues on one machine
    (`python train.py --resume latest`, stopped again by SIGTERM), then on two again, stopped by SIGTERM to every
    process of both machines at once (as srun or `scancel --signal` deliver it), then on two to the end: every loss
    is the uninterrupted run's, and every checkpoint of two machines is written once, by the main process, with
    both processes' data positions. No process outlives its launcher.

    torchrun's agent reports 1 whatever its workers exit with (75 included), so the launchers' own codes say nothing.
    """
    ref = read_metrics(reference[0])[0]
    out = tmp_path / "run"
    args = _args(data_dir, out, "--resume", "latest")

    # 1. Two machines; SIGTERM to machine 1's launcher only.
    with machines(2, args, tmp_path / "a") as (m0, m1):
        wait_for_step(out / "metrics.jsonl", random.randint(2, 4), [m0, m1])
        m1.signal_launcher(signal.SIGTERM)
        ended = wait_all([m0, m1], 120)
        assert all(code is not None for code, _ in ended.values()), ended
        assert not m0.alive() and not m1.alive(), "processes outlived their launcher"
        output = m0.output() + m1.output()
    first = _stopped_at(out, output)
    assert _worker_exit_codes(m0.output()) and set(_worker_exit_codes(m0.output())) == {75}, m0.output()[-3000:]
    saved = out / "checkpoints" / ckpt.checkpoint_name(first)
    assert sorted(p.name for p in saved.glob("loader_rank*.json")) == ["loader_rank0.json", "loader_rank1.json"]

    # 2. One machine, one process: stopped by SIGTERM two steps later.
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for_step(out / "metrics.jsonl", first + 2, [proc])
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, output[-3000:]
    second = _stopped_at(out, output)
    assert second > first

    # 3. Two machines again, SIGTERM to every process at once; then 4. two machines to the end.
    with machines(2, args, tmp_path / "b") as (m0, m1):
        wait_for_step(out / "metrics.jsonl", second + 2, [m0, m1])
        for m in (m0, m1):
            m.signal_all(signal.SIGTERM)
        wait_all([m0, m1], 120)
        assert not m0.alive() and not m1.alive(), "processes outlived their launcher"
        third = _stopped_at(out, m0.output() + m1.output())
    assert second < third < MAX_STEPS
    with machines(2, args, tmp_path / "c") as (m0, m1):
        ended = wait_all([m0, m1], 240)
        assert [code for code, _ in ended.values()] == [0, 0], m0.output()[-3000:]
    losses = read_metrics(out)[0]
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    _close(losses, ref)
    info = json.loads((out / "run_info.json").read_text())
    assert [a["start_step"] for a in info["attempts"]] == [0, first, second, third]
    assert [a["changed"].get("num_processes") for a in info["attempts"][1:]] == [[2, 1], [1, 2], None]
    assert info["num_processes"] == 2 and info["grad_accum_steps"] == 1
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 16]
    newest = out / "checkpoints" / "step_00000016"
    assert sorted(p.name for p in newest.glob("loader_rank*.json")) == ["loader_rank0.json", "loader_rank1.json"]


def _stopped_at(out: Path, output: str) -> int:
    """The step a stop saved, as train.py names it: the run's last logged step and its newest complete checkpoint."""
    found = re.findall(r"stopped at step (\d+) \(.*\): checkpoint (\S+) is complete", output)
    assert len(found) == 1, output[-4000:]  # one process speaks for all
    step, path = int(found[0][0]), Path(found[0][1])
    assert max(read_metrics(out)[0]) == step
    assert ckpt.list_checkpoints(out / "checkpoints")[-1] == (step, path)
    assert not list((out / "checkpoints").glob(".*")), "temporary checkpoint folders left behind"
    _no_trainer_traceback(output)
    return step


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigkill", "hang"])
def test_a_machine_that_dies_or_hangs_stops_the_other_in_bounded_time(fault, data_dir, tmp_path):
    """Machine 1 is killed (SIGKILL to its agent and worker: its kernel closes the sockets) or hangs (SIGSTOP: a
    machine that freezes or drops off the network, its sockets left open). Machine 0 stops within the collective
    timeout the user set (here 10 s; not gloo's 30 minutes), says in one `error:` line that a process was lost and
    to continue with --resume latest, without a traceback of train.py, and leaves no process behind."""
    timeout_s = 10
    out = tmp_path / "run"
    args = _args(data_dir, out, "--max_steps", "400", "--checkpoint_every", "2", DIST_TIMEOUT_OPTION, str(timeout_s))
    with machines(2, args, tmp_path) as (m0, m1):
        wait_for_step(out / "metrics.jsonl", 3, [m0, m1])
        t0 = time.time()
        m1.signal_all(signal.SIGKILL if fault == "sigkill" else signal.SIGSTOP)
        code, took = wait_all([m0], timeout_s + 50)[0]
        assert code is not None, f"machine 0 still running {took:.0f} s after machine 1 was lost"
        assert time.time() - t0 < timeout_s + 50
        line = _one_error_line(m0.output())
        assert "--resume latest" in line, line
        time.sleep(1)
        assert not m0.alive(), "machine 0 left processes behind"
    assert ckpt.list_checkpoints(out / "checkpoints"), "the checkpoints written before are whole"


@pytest.mark.slow
def test_machines_that_do_not_share_the_run_folder_are_refused(data_dir, tmp_path):
    """Each machine sees its own --output_dir (the same path on two machines without a shared file system): the
    run is refused at start, on both, with one `error:` line, before anything but the lock is written."""
    runs = [tmp_path / "machine0" / "run", tmp_path / "machine1" / "run"]
    with machines(2, [_args(data_dir, r, "--dist_timeout", "30") for r in runs], tmp_path) as (m0, m1):
        ended = wait_all([m0, m1], 120)
        assert all(code not in (None, 0) for code, _ in ended.values()), ended
        line = _one_error_line(m0.output() + m1.output())
        assert "shared" in line and "file system" in line, line
    for run in runs:
        assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()
        assert not (run / "checkpoints").exists()


# ------------------------------------------------------------------------- launches that form no group


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["accelerate_config_2_processes", "fsdp_config", "cpu_two_machines"])
def test_a_launch_whose_processes_form_no_group_is_refused(launch, data_dir, tmp_path):
    """Launches that start several processes which never join one process group on this CPU machine (accelerate
    gives each DistributedType.NO and 1 process), so each would train the whole run on its own into the same folder:

    - the repository's accelerate_config.yaml (MULTI_GPU) with --num_processes 2: torchrun's WORLD_SIZE=2;
    - an FSDP accelerate config: the same;
    - `accelerate launch --cpu --num_machines 2 --machine_rank 0/1 --main_process_ip 127.0.0.1` on two launchers:
      one process each, MASTER_ADDR set, no RANK or WORLD_SIZE.

    Refused: exit code 2 from every process, one `error:` line per launcher naming the way that works
    (torchrun with ACCELERATE_USE_CPU=true), nothing written to the run folder but the lock."""
    out = tmp_path / "run"
    acc = [sys.executable, "-m", "accelerate.commands.launch"]
    train = [str(ROOT / "train.py"), *_args(data_dir, out)]
    if launch == "accelerate_config_2_processes":
        commands = [[*acc, "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", "2", *train]]
    elif launch == "fsdp_config":
        (tmp_path / "fsdp.yaml").write_text(FSDP_TWO_PROCESSES_YAML)
        commands = [[*acc, "--config_file", str(tmp_path / "fsdp.yaml"), *train]]
    else:
        port = str(free_port())
        commands = [[*acc, "--cpu", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
                     "127.0.0.1", "--main_process_port", port, *train] for rank in (0, 1)]  # fmt: skip
    procs = [subprocess.Popen(c, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]  # fmt: skip
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=180)[0])
        finally:
            p.kill()
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode != 0, output[-3000:]  # the launchers report 1 when a process fails
        line = _one_error_line(output)
        assert "torchrun" in line and "ACCELERATE_USE_CPU" in line, line
        codes = _worker_exit_codes(output)  # torchrun ends the others once one failed: SIGTERM (-15) may beat their 2
        assert not codes or (2 in codes and set(codes) <= {2, -signal.SIGTERM}), output[-3000:]
    _only_the_lock(out)


# ------------------------------------------------------------------------------ a stop inside the grace


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_is_obeyed_within_its_grace_under_load(data_dir, tmp_path):
    """The tiny preset's model (4 layers, width 128, 50,304-word vocabulary: its full checkpoint is 0.13 GB, the
    stock export's conversion included), in micro-batches of 2, under `accelerate launch --cpu --num_processes 1`,
    with two other processes keeping both cores busy. SIGTERM to the launcher, which passes it on and kills
    train.py 5 s later: train.py stops at the next micro-batch and exits 75 inside those 5 s with a quick
    checkpoint of its last completed step, and `--resume latest` writes the rest of that checkpoint (tokenizer,
    card, stock export), then trains to the end."""
    preset = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--data_dir", str(data_dir), "--val_tokens", "512"]
    preset += ["--hellaswag", "false", "--num_samples", "0", "--eval_every", "0", "--log_with", "none"]
    preset += ["--max_steps", "8", "--warmup_steps", "2", "--checkpoint_every", "0"]
    # Micro-batches of 2 sequences (accumulation 8, the same tokens per step): the stop waits for the micro-batch in
    # flight, and on two cores shared four ways (the suite's other worker, too) one of 8 sequences takes seconds.
    preset += ["--micro_batch_size", "2"]
    burn = "import time\nend = time.time() + 600\nwhile time.time() < end: pass"  # a core's worth of other work
    others = []
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    try:
        proc = subprocess.Popen([*launcher, str(ROOT / "train.py"), *preset, "--output_dir", str(out)], cwd=ROOT,
                                env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            wait_for_step(out / "metrics.jsonl", 2, [proc], timeout=300)
            # the load from here on: the steps before the stop and the stop itself run on oversubscribed cores
            others = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
            wait_for_step(out / "metrics.jsonl", 3, [proc], timeout=300)
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=120)
            took = time.time() - t0
        finally:
            proc.kill()
    finally:
        for other in others:
            other.kill()
            other.wait()
    # 143: the launcher reports the SIGTERM it received, whatever train.py did; the stop message says it saved.
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    step = _stopped_at(out, output)
    # The launcher kills train.py 5 s after SIGTERM whatever it is doing, so the stop message and the complete
    # checkpoint (_stopped_at) are what prove the stop fitted; its own exit after the kill takes 1-1.5 s under load.
    assert took < ACCELERATE_GRACE_S + 5, f"{took:.1f} s from SIGTERM to the launcher's exit"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    saved = out / "checkpoints" / ckpt.checkpoint_name(step)
    assert json.loads((saved / "run_state.json").read_text())["deferred"] and not (saved / "export-gpt2").exists()
    # the resume in micro-batches of 8 (the same tokens per step, so allowed): the load is gone, the grace too
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), *preset, "--output_dir", str(out),
                              "--resume", "latest", "--micro_batch_size", "8"], cwd=ROOT, env=run_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stdout + resumed.stderr
    assert "deferred when the run stopped" in resumed.stdout + resumed.stderr
    assert sorted(read_metrics(out)[0]) == list(range(1, 9))
    assert (out / "export" / "model.safetensors").is_file() and (out / "export-gpt2" / "model.safetensors").is_file()
