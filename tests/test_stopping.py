"""training/stopping.py: stop requests (signals, launcher exit), the divergence guard."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from gpt2_repro.evaluation.models import nonfinite_parameters
from gpt2_repro.training.stopping import DivergenceGuard, StopRequest, launcher_pid


def test_stop_request_catches_sigterm_and_sigusr1_and_restores_the_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        with StopRequest() as stop:
            assert not stop.requested
            os.kill(os.getpid(), sig)  # delivered to this (main) thread before the next bytecode
            assert stop.requested and signal.Signals(sig).name in stop.reason
            os.kill(os.getpid(), sig)  # a repeat changes nothing
            assert signal.Signals(sig).name in stop.reason
        assert {s: signal.getsignal(s) for s in before} == before


def test_the_launcher_is_watched_every_second_or_as_often_as_the_environment_says(monkeypatch):
    monkeypatch.delenv("GPT2_REPRO_LAUNCHER_POLL", raising=False)
    assert StopRequest().poll_seconds == 1.0
    monkeypatch.setenv("GPT2_REPRO_LAUNCHER_POLL", "0.05")  # what the end-to-end tests of stopping set
    assert StopRequest().poll_seconds == 0.05 and StopRequest(poll_seconds=2).poll_seconds == 2


def test_only_launchers_are_watched():
    assert launcher_pid(env={}) is None  # pytest's parent is a shell or a CI runner, not a launcher
    parent = os.getppid()  # 1 when pytest was orphaned (nohup ... &): no launcher to watch then
    assert launcher_pid(env={"TORCHELASTIC_RUN_ID": "x"}) == (parent if parent > 1 else None)


def test_divergence_guard_counts_consecutive_bad_steps():
    guard = DivergenceGuard(max_bad_steps=3)
    guard.update(1, bad=False, loss=5.0)
    for step in (2, 3):
        guard.update(step, bad=True, loss=float("nan"))
    assert guard.streak == 2 and not guard.exhausted
    guard.update(4, bad=False, loss=4.0)  # one good step ends the streak
    assert guard.streak == 0 and guard.last_good == (4, 4.0)
    for step in (5, 6, 7):
        guard.update(step, bad=True, loss=float("inf"))
    assert guard.exhausted
    assert "steps 5-7 (3 in a row" in guard.describe(7) and "4.0000 at step 4" in guard.describe(7)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_nonfinite_parameters_one_value_is_enough(bad):
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight[63, 63] = bad
    assert nonfinite_parameters(model) == ["weight"]


CHILD = """
import os, sys
from gpt2_repro.training import stopping as stopping
if sys.argv[1] == "keep":
    stopping.keep_stderr_writable()
os.read(0, 1)  # the parent has closed the reading end of our stderr
print("progress", file=sys.stderr)
stopping._say("signal handler's message")
print("last words", file=sys.stderr)
"""


@pytest.mark.parametrize("keep", [True, False])
def test_stderr_falls_back_to_stdout_when_its_reader_is_gone(keep):
    """A real process whose stderr reader (a launcher relaying it) exits: with keep_stderr_writable every later message
    reaches stdout and the process goes on; without, its first write to stderr ends it (the control)."""
    args = [sys.executable, "-c", CHILD, "keep" if keep else "no"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stderr.close()
    stdout, _ = proc.communicate("x", timeout=60)
    if keep:
        assert proc.returncode == 0 and stdout.split("\n") == [
            "progress",
            "",
            "signal handler's message",
            "last words",
            "",
        ]
    else:
        assert proc.returncode != 0 and stdout == ""
