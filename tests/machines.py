"""Several "machines" on localhost, for the tests and benchmarks of multi-node training: one torchrun agent per
machine (`--nnodes N --node_rank R`, static rendezvous on 127.0.0.1), each in its own session, its workers found
through the process tree. Shared by tests/test_cluster.py and bench/cluster/two_nodes.py (as synthetic.py is).

On CPU, accelerate cannot launch several machines itself (`accelerate launch --cpu --num_machines 2` starts one
process per machine that never joins the others); torchrun, which `accelerate launch` runs on GPU nodes, does, and
ACCELERATE_USE_CPU=true makes accelerate join its processes over gloo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# An accelerate FSDP config of 2 processes on one machine. On a machine without CUDA accelerate joins its processes
# into no group (each gets DistributedType.NO and 1 process): a launch the trainer must refuse.
FSDP_TWO_PROCESSES_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP,
  fsdp_transformer_layer_cls_to_wrap: GPT2ReproBlock, fsdp_state_dict_type: SHARDED_STATE_DICT}
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: 'no'
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: false
"""


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice), for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """This process's environment without what a launcher or accelerate config would have set, plus `extra`."""
    drop = (
        "ACCELERATE_",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_",
        "TORCHELASTIC_",
        "HF_TOKEN",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    return env


class Machine:
    """One machine's launcher: `torchrun --nnodes N --node_rank R --nproc_per_node P ... train.py ARGS`, output to
    `log`; every process it starts is remembered (`track`), so that what it leaves behind can be found and killed."""

    def __init__(self, node_rank: int, nnodes: int, port: int, script_args: list[str], log: Path, nproc: int = 1,
                 script: Path = ROOT / "train.py", env: dict | None = None, rdzv: str = "static"):  # fmt: skip
        self.node_rank, self.log = node_rank, log
        cmd = [*TORCHRUN, "--nnodes", str(nnodes), "--nproc_per_node", str(nproc)]
        if rdzv == "static":  # node ranks given; machine 0's agent hosts the store
            cmd += ["--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        else:  # c10d: the agents agree on node ranks themselves
            cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"run{port}"]
        cmd += [str(script), *script_args]
        self.cmd = cmd
        self._out = open(log, "w")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=clean_env(ACCELERATE_USE_CPU="true", **(env or {})),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C or job control does not reach it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        # Every process this machine started that was ever seen (torchrun starts each worker in a session of its
        # own, so a session or process group does not find them once the agent is gone).
        self._seen: dict[int, psutil.Process] = {}
        self.track()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def track(self) -> None:
        """Remember the agent's descendants alive now (call it while they run: wait_for_step does)."""
        with contextlib.suppress(psutil.Error):
            agent = psutil.Process(self.pid)
            for p in [agent, *agent.children(recursive=True)]:
                self._seen.setdefault(p.pid, p)

    def workers(self) -> list[int]:
        """The training processes (torchrun's children), alive now."""
        self.track()
        try:
            return [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def alive(self) -> list[int]:
        """Every process of this machine still alive: the agent, its workers, anything they left behind."""
        self.track()
        found = []
        for pid, p in self._seen.items():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(pid)
        return found

    def signal_launcher(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def signal_workers(self, sig: int) -> None:
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def signal_all(self, sig: int) -> None:
        """The launcher and its workers at once, as `srun` or `scancel --signal` deliver a signal to a job step."""
        for pid in [self.pid, *self.workers()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.returncode is not None:
                self._out.close()

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, for a stopped one) to every process of this machine still alive; idempotent."""
        for pid in self.alive():
            with contextlib.suppress(psutil.Error):
                self._seen[pid].send_signal(signal.SIGCONT)
                self._seen[pid].kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._out.close()

    def output(self) -> str:
        """Everything the launcher and its workers printed so far."""
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def machines(n: int, script_args: list[str] | list[list[str]], folder: Path, **kw):
    """`n` machines on localhost, each `Machine(r, n, port, args, folder / f"machine{r}.log")`; every process they
    started is killed on the way out (a no-op when all ended). `script_args`: one list for all, or one per machine."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    per_machine = script_args if script_args and isinstance(script_args[0], list) else [script_args] * n
    started = []
    try:
        for r in range(n):
            started.append(Machine(r, n, port, per_machine[r], folder / f"machine{r}.log", **kw))
        yield started
    finally:
        for m in started:
            m.kill()


def wait_for_step(metrics: Path, step: int, procs, timeout: float = 240) -> None:
    """Until metrics.jsonl holds `step` training lines; fails if every process in `procs` (Machines or Popens)
    ended or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= step:
            return
        for p in procs:
            getattr(p, "track", lambda: None)()
        if all(getattr(p, "proc", p).poll() is not None for p in procs):
            break
        time.sleep(0.01)
    raise AssertionError(f"the run ended or stalled before step {step}")


def wait_all(machine_list, timeout: float) -> dict[int, tuple[int | None, float]]:
    """{node_rank: (launcher's exit code or None if still running at the deadline, seconds until it ended)}."""
    t0, ended = time.time(), {}
    while len(ended) < len(machine_list) and time.time() - t0 < timeout:
        for m in machine_list:
            if m.node_rank not in ended and m.proc.poll() is not None:
                ended[m.node_rank] = (m.proc.returncode, time.time() - t0)
        time.sleep(0.02)
    for m in machine_list:
        ended.setdefault(m.node_rank, (None, time.time() - t0))
    return ended
