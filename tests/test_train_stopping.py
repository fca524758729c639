"""train.py stopped early: divergence, SIGTERM (one process and two, elastic resume), Ctrl-C, a second run into the
folder."""

import json
import os
import random
import shutil
import signal
import sys
import time

import pytest

from gpt2_repro.checkpointing import folders as ckpt
from gpt2_repro.training.stopping import PREEMPTED_EXIT_CODE
from runs import (
    MAX_STEPS,
    expect_exit_2,
    finite_tensors,
    read_metrics,
    run_training,
    run_unchecked,
    stopped_at,
    training_in_background,
    wait_for_step,
)


@pytest.mark.slow
def test_divergence_is_caught_and_never_reaches_a_checkpoint_or_export(reference, data_dir, tmp_path):
    """LR 1e6 on a trained model: updates with a non-finite loss or gradient norm are skipped, the run stops after
    --max_bad_steps of them naming the last good checkpoint, and nothing non-finite is ever written."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out, symlinks=True)
    export_before = (out / "export" / "model.safetensors").read_bytes()
    args = ["--data_dir", str(data_dir), "--hellaswag", "false"]
    args += ["--resume", "latest", "--max_steps", "24", "--max_lr", "1e6", "--min_lr", "1"]
    args += ["--max_bad_steps", "3", "--checkpoint_every", "2", "--eval_every", "2"]
    line = expect_exit_2(run_unchecked(args, out))
    assert "training diverged: the loss or gradient norm was not finite at steps" in line
    assert f"the newest checkpoint, {out / 'checkpoints' / 'step_00000016'} (step 16)" in line
    assert "--resume latest --max_lr 500000" in line
    assert "checkpoints/step_00000012" in line  # the older one to try next
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 16]  # none rotated away
    assert (out / "export" / "model.safetensors").read_bytes() == export_before
    assert finite_tensors(out) >= 6
    rows = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    bad = [r for r in rows if r.get("skipped")]
    assert len(bad) == 3 and all(r["loss"] is None or r["grad_norm"] is None for r in bad)
    attempts = json.loads((out / "run_info.json").read_text())["attempts"]
    assert attempts[-1]["changed"]["max_lr"] == [1e-2, 1e6] and attempts[-1]["start_step"] == 16

    # Weights that turn non-finite within a finite step (a decay factor of -inf) are never saved either.
    args = ["--data_dir", str(data_dir), "--hellaswag", "false"]
    fresh = run_unchecked([*args, "--weight_decay", "1e45", "--checkpoint_every", "1"], tmp_path / "fresh")
    line = expect_exit_2(fresh)
    assert "the weights at step 1 hold NaN or inf" in line and "nothing to resume" in line
    assert not (tmp_path / "fresh" / "checkpoints").exists() and not (tmp_path / "fresh" / "export").exists()

    # A run that reaches max_steps inside a streak shorter than --max_bad_steps (step 1 finite, then every loss
    # not) has diverged too: no final checkpoint or export of weights whose last loss was not finite.
    streak = tmp_path / "streak"
    line = expect_exit_2(run_unchecked([*args, "--max_steps", "8", "--max_lr", "1e6", "--warmup_steps", "1"], streak))
    assert "training diverged" in line and "the run ended inside this streak" in line, line
    assert "--max_lr 500000" in line and "nothing to resume" in line
    assert not (streak / "checkpoints").exists() and not (streak / "export").exists()
    rows = [json.loads(r) for r in (streak / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == list(range(2, 9)) and "val_loss" not in rows[-1]


@pytest.mark.slow
def test_sigterm_inside_a_streak_of_skipped_steps_saves_nothing_and_names_the_checkpoint_to_resume(
    reference, data_dir, tmp_path
):
    """LR 1e6 on the trained reference, 26 steps: step 17's update (at LR 3.7e5) wrecks the weights and every later
    step is skipped (a skipped step leaves them as they are, so each later loss is not finite either). SIGTERM once
    the streak has begun, at step 18: exit 75, no checkpoint or export of those weights, and the message names the
    checkpoint the resume starts from."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out, symlinks=True)
    export_before = (out / "export" / "model.safetensors").read_bytes()
    args = ["--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "latest", "--max_steps", "26"]
    args += ["--max_lr", "1e6", "--min_lr", "1", "--max_bad_steps", "1000", "--checkpoint_every", "2"]
    with training_in_background([*args, "--eval_every", "2"], out) as proc:
        deadline = time.time() + 240
        while '"skipped": true' not in (out / "metrics.jsonl").read_text() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE and "Traceback" not in err, err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["step"]
    assert [r["step"] for r in rows if r["step"] > 16] == list(range(17, last + 1)) and 18 <= last < 26, rows[-3:]
    assert all(r.get("skipped") for r in rows if r["step"] > 17), rows[-3:]  # nothing but skipped steps after 17
    newest = out / "checkpoints" / "step_00000016"
    assert (
        f"stopped at step {last} (SIGTERM received): no checkpoint of these weights, whose last loss was not finite; "
        f"the newest is {newest} (step 16), and the steps after it are trained again. Continue with --resume latest"
    ) in err, err[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 16]
    assert not list((out / "checkpoints").glob(".*"))
    assert (out / "export" / "model.safetensors").read_bytes() == export_before
    assert finite_tensors(out) >= 6


@pytest.mark.slow
def test_sigterm_saves_the_step_it_is_on_and_the_resume_is_exact(reference, data_dir, tmp_path):
    """One process, stopped three times, each time with a checkpoint at the current step; the resumed losses and
    evaluations are bit-identical to the uninterrupted reference.

    1. `accelerate launch` killed (SIGKILL, the launcher only): train.py sees its launcher exit. Since accelerate 1.16
       the launcher relays train.py's stderr through a pipe that dies with it; the stop message then comes on stdout.
    2. SIGTERM to the launcher only: accelerate 1.16 and later pass it on to train.py (and kill it 5 s later: the
       tiny model saves well within that); older ones do not, and train.py sees its launcher exit.
    3. SIGUSR1 (SLURM's early warning) to train.py itself, run with --debug: exit code 75 (--debug adds the
       traceback, not another code).

    train.py looks at its launcher every 0.05 s here (GPT2_REPRO_LAUNCHER_POLL; 1 s by default), so the tiny run's
    fast steps cannot reach max_steps before it notices; the steps waited for are drawn from a seeded generator.
    """
    from accelerate import __version__ as accelerate_version
    from packaging.version import Version

    rng = random.Random(11)
    waits = [rng.randint(1, 3), rng.randint(1, 2), rng.randint(1, 2)]
    print("steps waited before each stop:", waits)
    ref_losses, ref_evals = read_metrics(reference[0])
    out = tmp_path / "run"
    data = ["--data_dir", str(data_dir), "--hellaswag", "false"]
    poll = {"GPT2_REPRO_LAUNCHER_POLL": "0.05"}
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    with training_in_background(data, out, accelerate, **poll) as proc:
        wait_for_step(out, waits[0], proc)  # it notices within 0.05 s: steps go on
        proc.send_signal(signal.SIGKILL)  # the launcher only
        stdout, err = proc.communicate(timeout=240)  # returns when train.py, too, closed the pipes
    assert proc.returncode == -signal.SIGKILL and f"the launcher (pid {proc.pid}) exited" in stdout + err
    first = stopped_at(out, stdout + err)

    forwards = Version(accelerate_version) >= Version("1.16")
    with training_in_background([*data, "--resume", "latest"], out, accelerate, **poll) as proc:
        wait_for_step(out, first + waits[1], proc)
        proc.send_signal(signal.SIGTERM)  # the launcher only
        stdout, err = proc.communicate(timeout=240)
    if forwards:  # the launcher exits with 128 + SIGTERM once train.py has
        assert proc.returncode == 128 + signal.SIGTERM and "stopped at step" in err and "SIGTERM received" in err
    else:
        assert proc.returncode == -signal.SIGTERM and f"the launcher (pid {proc.pid}) exited" in err
    second = stopped_at(out, err)
    assert first < second, waits

    with training_in_background([*data, "--resume", "latest", "--debug"], out, **poll) as proc:
        wait_for_step(out, second + waits[2], proc)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    third = stopped_at(out, err, tracebacks=1)  # --debug: the Stop's own traceback
    assert f"stopped at step {third} (SIGUSR1 received): checkpoint" in err, err[-3000:]
    assert second < third < MAX_STEPS, waits

    run_training([*data, "--resume", "latest"], out)
    losses, evals = read_metrics(out)
    assert losses == ref_losses, (waits, first, second, third)
    assert {s: e["val_loss"] for s, e in evals.items()} == {s: e["val_loss"] for s, e in ref_evals.items()}
    attempts = json.loads((out / "run_info.json").read_text())["attempts"]
    assert [a["start_step"] for a in attempts] == [0, first, second, third]


@pytest.mark.slow
def test_ctrl_c_during_the_stop_checkpoint_keeps_the_previous_one(data_dir, tmp_path):
    """SIGTERM, then SIGINT while that checkpoint is being written: exit 130, the half-written checkpoint is gone,
    the previous one is whole, and the message says so."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--max_steps", "60", "--hellaswag", "false"]
    args += ["--eval_every", "0", "--num_samples", "0", "--log_with", "none"]
    with training_in_background(args, out) as proc:
        wait_for_step(out, 5, proc)  # checkpoint 4 is whole
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob(".tmp-*")) and time.time() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    newest = out / "checkpoints" / "step_00000004"
    assert f"interrupted: the newest complete checkpoint is {newest} (step 4)" in err
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [4]
    assert not list((out / "checkpoints").glob(".*"))
    assert ckpt.read_run_state(newest)["step"] == 4 and finite_tensors(newest) >= 3


@pytest.mark.slow
def test_two_runs_cannot_share_a_folder(data_dir, tmp_path):
    """A second run into a busy folder is refused at once, naming the first, and changes nothing; Ctrl-C on the
    first says truthfully that there is nothing to resume yet; then the folder is free."""
    from gpt2_repro.base.lock import RunLock

    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--max_steps", "500", "--checkpoint_every", "0"]
    args += ["--eval_every", "0", "--hellaswag", "false", "--num_samples", "0"]
    with training_in_background(args, out) as first:
        wait_for_step(out, 2, first)
        written = {name: (out / name).read_bytes() for name in ("config.yaml", "run_info.json")}
        second = run_unchecked([*args, "--max_steps", "7"], out)
        line = expect_exit_2(second)
        assert f"is in use by another run (pid {first.pid} on host" in line
        assert {name: (out / name).read_bytes() for name in written} == written
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-3000:]
    assert "interrupted: no checkpoint was written yet, so there is nothing to resume" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer
    with RunLock(out):  # released with the process
        pass


@pytest.mark.slow
@pytest.mark.parametrize("case", ["removed", "truncated"])
def test_data_taken_away_during_training_is_named_and_loses_no_saved_step(case, gpt2_encoding, data_dir, tmp_path):
    """The data folder removed during the run: the final checkpoint is saved before the final evaluation, which
    then fails with one line naming the data's source and the command that prepares it again, and the checkpoint
    to resume. A training shard truncated in place: one line naming it and what to do, not a SIGBUS."""
    data, out = tmp_path / "data", tmp_path / "run"
    if case == "removed":
        from gpt2_repro.data.prepare import PrepConfig, prepare
        from synthetic import make_texts

        source = tmp_path / "corpus.txt"
        source.write_text("\n\n".join(make_texts(150, seed=9, words=(50, 200))))
        prepare(PrepConfig(dataset=str(source), output_dir=str(data), val_tokens=4096, progress=False))
        args = ["--max_steps", "12"]
    else:
        shutil.copytree(data_dir, data)
        args = ["--max_steps", "200"]
    args += ["--data_dir", str(data), "--checkpoint_every", "0", "--eval_every", "0", "--hellaswag", "false"]
    with training_in_background([*args, "--num_samples", "0", "--log_with", "none"], out) as proc:
        wait_for_step(out, 2, proc)
        if case == "removed":
            shutil.rmtree(data)  # the training shards stay readable through their memory maps; not the val shard
        else:
            os.truncate(data / "test_train_000001.bin", 4096)
        _, err = proc.communicate(timeout=240)
    line = expect_exit_2(proc, err)
    if case == "removed":
        newest = out / "checkpoints" / "step_00000012"
        assert "step 12: the validation data cannot be read any more" in line, line
        command = f"python data_prep.py --dataset {source} --output_dir {data} --val_tokens 4096"
        assert f"prepare it again from its source, {source}: `{command}" in line, line
        assert f"the newest complete checkpoint is {newest} (step 12): continue with --resume latest" in line, line
        assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12]
    else:
        assert f"{data / 'test_train_000001.bin'} shrank from 52,832 to 4,096 bytes while training read it" in line
        assert "then continue with --resume latest" in line, line
