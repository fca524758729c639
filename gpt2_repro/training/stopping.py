"""Why a training run stops early, and how it stops without losing work.

- `StopRequest`: SIGTERM (what SLURM, Kubernetes and spot instances send first) and SIGUSR1 (what SLURM sends ahead
  of time with `--signal=USR1@120`) set a flag, and so does the exit of the launcher that started this process:
  `accelerate launch` with one process runs train.py as a child; a signal it does not pass on (any, before version
  1.16; SIGUSR1 or SIGKILL since) kills it and would leave the child training on, orphaned. The trainer folds the flag
  into the loss reduction its step already does (every process learns it at the same step, at no extra cost),
  saves a complete checkpoint at that step and exits with PREEMPTED_EXIT_CODE.
- `keep_stderr_writable`: `accelerate launch` (1.16 and later) relays the child's stderr through a pipe it reads, so
  once the launcher is gone every write there fails; stderr then falls back to stdout, and the run goes on to save.
- `DivergenceGuard`: counts consecutive optimizer steps whose update was skipped because the loss or the gradient
  norm was not finite, and says when the run must stop.
- `preempted`: the message that ends a stopped run, saying what can be resumed.

SIGINT (Ctrl-C) is left to Python: it raises KeyboardInterrupt at once, wherever the run is.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import psutil

from ..base.errors import Stop
from ..base.launch import is_main_process

# EX_TEMPFAIL of sysexits.h ("temporary failure; retry later"): a checkpoint was saved, continue with --resume latest.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Seconds between two looks at the launcher (default 1): the tests shorten it, so that a run they stop notices within
# a step or two however fast its steps are.
POLL_ENV = "GPT2_REPRO_LAUNCHER_POLL"


def _say(message: str) -> None:
    """Print from a signal handler: os.write, because print() may be interrupted inside its own buffer's lock."""
    if is_main_process():  # one process speaks for all
        _retry_broken_pipe(lambda: os.write(2, f"\n{message}\n".encode()))


# Where fd 2 goes once its reader is gone: stdout (which launchers pass through: the terminal or job log they were
# started with), then nowhere when stdout is gone too.
_STDERR_FALLBACKS = ["stdout", os.devnull]


def _retry_broken_pipe(write):
    """write(), retried on a fallback stderr while it raises BrokenPipeError (Python ignores SIGPIPE: a write to a
    pipe without a reader raises instead of killing the process)."""
    while True:
        try:
            return write()
        except BrokenPipeError:
            if not _STDERR_FALLBACKS:
                raise
            target = _STDERR_FALLBACKS.pop(0)
            if target == "stdout":
                os.dup2(1, 2)
            else:
                fd = os.open(target, os.O_WRONLY)
                os.dup2(fd, 2)
                os.close(fd)


class _FallbackStderr:
    """sys.stderr whose writes survive the loss of its reader (see keep_stderr_writable); the rest is the stream's.
    Python's stderr writes through (no buffer), so a retried write is not printed twice."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return _retry_broken_pipe(lambda: self.stream.write(text))

    def flush(self) -> None:
        _retry_broken_pipe(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def keep_stderr_writable() -> None:
    """Make stderr outlive its reader, for the rest of this process (idempotent).

    `accelerate launch` 1.16 and later reads its child's stderr through a pipe (to quote it if the child fails).
    When the launcher dies (SIGKILL, a signal it leaves at its default action such as SIGUSR1 or SIGHUP), the next
    write to stderr, a progress bar's, raises BrokenPipeError and would end the run before it saves; and the last
    words of a run, printed after training, need stderr most. On the first such error, fd 2 is pointed at stdout
    (at /dev/null if that fails too) and the write is retried, so the stop message reaches the terminal or job log.
    """
    if not isinstance(sys.stderr, _FallbackStderr):
        sys.stderr = _FallbackStderr(sys.stderr)


def launcher_pid(env=os.environ) -> int | None:
    """The parent process when it is a launcher whose exit must stop this process, else None.

    Launchers: torchrun's agent (it sets TORCHELASTIC_RUN_ID; `accelerate launch` with several processes runs it)
    and `accelerate launch` itself. Any other parent (a shell, nohup, a batch script) may exit while training goes
    on as intended.
    """
    parent = os.getppid()
    if parent <= 1:
        return None
    if env.get("TORCHELASTIC_RUN_ID"):
        return parent
    try:
        cmdline = psutil.Process(parent).cmdline()
    except psutil.Error:
        return None
    names = {Path(arg).name for arg in cmdline[:3]}
    if names & {"accelerate", "accelerate-launch"} or any(a.startswith("accelerate.commands") for a in cmdline[:3]):
        return parent
    return None


class StopRequest:
    """A request to stop, from a signal or from the launcher's exit, agreed by every process.

    Use as a context manager around the whole run: it installs the handlers and a watch on the launcher, and puts
    the previous handlers back on exit. `reason` is None until a request arrives. The run stops at the next
    micro-batch boundary (`agreed`, asked before each micro-batch) and saves the state of its last completed
    optimizer step; a request that arrives during the step's last micro-batch rides along the step's own loss
    reduction (`StepResult.stop`). Repeated SIGTERM/SIGUSR1 change nothing (`srun` signals every process and
    torchrun forwards the same signal again); SIGINT or SIGKILL abort, and the checkpoint being written is then left
    incomplete under its temporary name, so the previous one stays the newest.
    """

    def __init__(self, poll_seconds: float | None = None):
        self.reason: str | None = None
        self.poll_seconds = float(os.environ.get(POLL_ENV, 1.0)) if poll_seconds is None else poll_seconds
        self._previous: dict = {}
        self._done = threading.Event()
        self._group = None  # the processes' gloo group that agrees on a stop (join), None with one process

    @property
    def requested(self) -> bool:
        """Whether this process was asked to stop (the others may not know yet: `agreed`)."""
        return self.reason is not None

    def join(self, accelerator, timeout_seconds: float) -> None:
        """Agree with the other processes of `accelerator` from now on (a collective: every process calls it).

        The agreement is a one-integer all-reduce on a gloo group of its own: on the CPU, so that asking it before
        a micro-batch never waits for the GPU's queued work (a NCCL all-reduce would be read back with a device
        sync). It waits for a lost process as long as the run's other collectives do (`timeout_seconds`: a new
        group would otherwise wait gloo's 30 minutes). One process agrees with itself at no cost.
        """
        if accelerator.num_processes > 1:
            from datetime import timedelta

            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))

    def agreed(self) -> bool:
        """Whether any process was asked to stop: the same answer on every process, which all must ask together."""
        if self._group is None:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.reason is None:
            self.reason = "another process was asked to stop"
        return bool(flag.item())

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        launcher = launcher_pid()
        if launcher is not None:
            keep_stderr_writable()  # a launcher may read stderr through a pipe that dies with it
            watch = threading.Thread(target=self._watch, args=(launcher,), name="launcher-watch", daemon=True)
            watch.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Put the previous handlers back and stop watching the launcher (idempotent)."""
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            _say(
                f"{reason}: stopping at the next micro-batch with a checkpoint of the last completed step "
                "(Ctrl-C aborts at once; the previous checkpoint stays intact either way)"
            )
        else:
            _say(f"{reason}: already stopping ({self.reason}); the checkpoint is on its way")

    def _on_signal(self, signum, frame) -> None:
        self.request(f"{signal.Signals(signum).name} received")

    def _watch(self, launcher: int) -> None:
        """Poll the parent: when the launcher dies this process is re-parented, and getppid() changes."""
        while not self._done.wait(self.poll_seconds):
            if os.getppid() != launcher:
                self.request(f"the launcher (pid {launcher}) exited")
                return


class DivergenceGuard:
    """Consecutive optimizer steps skipped for a non-finite loss or gradient norm.

    A skipped step leaves weights and optimizer state as they were (the batch is consumed), as a gradient scaler
    does. One bad batch happens in healthy runs and the next steps recover; a streak of `max_bad_steps` means the
    run has diverged (or its weights went bad) and `exhausted` turns true.
    """

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.streak = 0
        self.first_bad_step: int | None = None
        self.last_good: tuple[int, float] | None = None  # (step, loss) of the newest finite step

    def update(self, step: int, bad: bool, loss: float) -> None:
        if not bad:
            self.streak, self.first_bad_step, self.last_good = 0, None, (step, loss)
            return
        self.streak += 1
        if self.streak == 1:
            self.first_bad_step = step

    @property
    def exhausted(self) -> bool:
        return self.streak >= self.max_bad_steps

    def describe(self, step: int) -> str:
        """What happened, e.g. "the loss or gradient norm was not finite at steps 5-14 (10 in a row; ...)"."""
        span = f"step {step}" if self.first_bad_step == step else f"steps {self.first_bad_step}-{step}"
        last = (
            f"last finite loss {self.last_good[1]:.4f} at step {self.last_good[0]}"
            if self.last_good
            else "no finite step in this attempt"
        )
        return (
            f"the loss or gradient norm was not finite at {span} ({self.streak} in a row; each update was "
            f"skipped; {last})"
        )


def preempted(stop: StopRequest, step: int, saved: Path | None, checkpoints: list, is_main: bool) -> Stop:
    """The orderly end after a stop request. `saved`: the checkpoint written at this step; None when the request came
    amid a streak of non-finite steps, whose weights are not saved (`checkpoints`: the complete ones, oldest first)."""
    reason = stop.reason or "another process was asked to stop"
    if saved is not None:
        what = f"checkpoint {saved} is complete (its card, tokenizer and stock export are written at the next start)"
    elif checkpoints:
        step_saved, newest = checkpoints[-1]
        what = (
            f"no checkpoint of these weights, whose last loss was not finite; the newest is {newest} (step "
            f"{step_saved}), and the steps after it are trained again"
        )
    else:
        what = "no checkpoint of these weights, whose last loss was not finite, and none before them: it starts over"
    message = (
        f"stopped at step {step} ({reason}): {what}. Continue with --resume latest (exit code {PREEMPTED_EXIT_CODE})."
    )
    return Stop(message if is_main else "", PREEMPTED_EXIT_CODE)


def stopped_before_training(stop: StopRequest, step: int, checkpoints: list, is_main: bool) -> Stop:
    """The orderly end of a run asked to stop before its first step: nothing new to save, and the scheduler's
    requeue (exit 75) starts it again where it was."""
    reason = stop.reason or "another process was asked to stop"
    where = f"the newest checkpoint is {checkpoints[-1][1]}" if checkpoints else "there is no checkpoint yet"
    message = (
        f"stopped before training step {step + 1} ({reason}): nothing new to save; {where}. Continue with --resume "
        f"latest (exit code {PREEMPTED_EXIT_CODE})."
    )
    return Stop(message if is_main else "", PREEMPTED_EXIT_CODE)
