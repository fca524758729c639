"""Two machines on localhost (one torchrun agent each, `--nnodes 2`, gloo): what train.py does today when one of them
is signalled, killed, hangs, or does not share the run folder. Prints one block per scenario: each launcher's exit
code and when it ended, the workers' exit codes (from torchrun's report), the step each machine's run reached, the
checkpoints, the error lines, and any process left behind.

    python bench/cluster/two_nodes.py                       # every scenario (about 6 minutes on 2 cores)
    python bench/cluster/two_nodes.py sigkill_worker1 equal # some of them
    python bench/cluster/two_nodes.py --train_args "--dist_timeout 15" hang1   # an option the trainer may grow
    python bench/cluster/two_nodes.py --rdzv c10d sigkill_launcher0            # agents that agree on node ranks

Scenarios: equal (losses of two machines, static and c10d rendezvous, against one process), sigterm_launcher0,
sigterm_launcher1, sigterm_all (every process at once, as srun / scancel --signal deliver it), sigkill_worker1,
sigkill_machine1 (agent and worker: a machine that dies; its kernel closes the sockets), sigkill_launcher1 (the agent
alone; its worker is orphaned), sigkill_launcher0 (the same on the machine whose agent hosts the rendezvous store),
sigkill_machine0 (the machine whose agent hosts the rendezvous store), hang1 (machine
1 stopped with SIGSTOP: a machine that hangs or drops off the network, its sockets left open), separate_fs (each
machine its own --output_dir: machines that do not share a file system).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from machines import clean_env, machines, wait_all, wait_for_step  # noqa: E402

TINY = "--config configs/tiny.yaml --n_layer 2 --n_head 4 --n_embd 64 --n_positions 64 --seq_len 32 "
TINY += "--micro_batch_size 4 --total_batch_tokens 256 --warmup_steps 2 --max_lr 1e-2 --min_lr 1e-3 --eval_every 0 "
TINY += "--val_tokens 512 --eval_batch_size 8 --hellaswag false --num_samples 0 --cpu_threads 1 --log_with none"


def make_data(folder: Path) -> Path:
    from gpt2_repro.data.shards import write_shard
    from synthetic import learnable_tokens

    folder.mkdir(parents=True, exist_ok=True)
    tokens = learnable_tokens(30000)
    write_shard(folder / "test_val_000000.bin", tokens[:4096])
    write_shard(folder / "test_train_000001.bin", tokens[4096:])
    return folder


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoints(run: Path) -> list[str]:
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def report(name: str, ms, ended: dict, t_fault: float, runs: list[Path], extra: str = "") -> None:
    print(f"\n== {name} {extra}")
    for m in ms:
        code, when = ended[m.node_rank]
        out = m.output()
        workers = re.findall(r"exitcode\s*:\s*(-?\d+)", out)
        errors = [line for line in out.splitlines() if line.startswith(("error:", "stopped at step"))]
        tb = out.count("Traceback")
        left = m.alive()
        state = f"exit {code} after {when:.1f} s" if code is not None else f"STILL RUNNING after {when:.0f} s"
        print(f"   machine {m.node_rank}: launcher {state}; workers' exit codes in torchrun's report {workers or '-'};"
              f" {tb} tracebacks; processes left: {left or 'none'}")  # fmt: skip
        for line in errors[:3]:
            print(f"      | {line[:400]}")
        if not errors:
            tail = [ln for ln in out.splitlines() if ln.strip() and "it/s" not in ln][-2:]
            for line in tail:
                print(f"      > {line[:300]}")
    for run in dict.fromkeys(runs):
        steps = losses(run) if (run / "metrics.jsonl").is_file() else {}
        print(f"   {run.name}: last step {max(steps) if steps else None}; checkpoints {checkpoints(run)}; "
              f"files {sorted(p.name for p in run.iterdir()) if run.is_dir() else 'none'}")  # fmt: skip


def separate_fs(tmp: Path, data: Path, train_args: list[str], observe: float) -> None:
    """Each machine its own --output_dir (the same path on machines that do not share it): 20 steps with a
    checkpoint every 10, then a resume of what each machine sees."""
    name = "separate_fs"
    runs = [tmp / name / "machine0" / "run", tmp / name / "machine1" / "run"]
    args = [*shlex.split(TINY), "--data_dir", str(data), "--max_steps", "20", "--checkpoint_every", "10", *train_args]
    per_machine = [[*args, "--output_dir", str(r)] for r in runs]
    for what, extra in (
        ("", []),
        (" then --resume latest --max_steps 30", ["--max_steps", "30", "--resume", "latest"]),
    ):
        logs = tmp / f"{name}{len(extra)}_logs"
        logs.mkdir()
        with machines(2, [[*a, *extra] for a in per_machine], logs) as ms:
            ended = wait_all(ms, observe)
            time.sleep(1)
            report(name + what, ms, ended, time.time(), runs)


def fault_scenario(name: str, tmp: Path, data: Path, train_args: list[str], observe: float, rdzv: str) -> None:
    if name == "separate_fs":
        return separate_fs(tmp, data, train_args, observe)
    out = tmp / name
    args = [*shlex.split(TINY), "--data_dir", str(data), "--max_steps", "400", "--checkpoint_every", "0", *train_args]
    per_machine = [[*args, "--output_dir", str(out)]] * 2
    runs = [out]
    logs = tmp / f"{name}_logs"
    with machines(2, per_machine, logs, rdzv=rdzv) as ms:
        m0, m1 = ms
        wait_for_step(out / "metrics.jsonl", 3, ms)
        t_fault = time.time()
        w1 = m1.workers()
        if name == "sigterm_launcher0":
            m0.signal_launcher(signal.SIGTERM)
        elif name == "sigterm_launcher1":
            m1.signal_launcher(signal.SIGTERM)
        elif name == "sigterm_all":
            for m in ms:
                m.signal_all(signal.SIGTERM)
        elif name == "sigkill_worker1":
            m1.signal_workers(signal.SIGKILL)
        elif name == "sigkill_machine1":
            m1.signal_all(signal.SIGKILL)
        elif name == "sigkill_launcher1":
            m1.signal_launcher(signal.SIGKILL)
        elif name == "sigkill_launcher0":
            m0.signal_launcher(signal.SIGKILL)
        elif name == "sigkill_machine0":
            m0.signal_all(signal.SIGKILL)
        elif name == "hang1":
            m1.signal_all(signal.SIGSTOP)
        survivors = ms if name.startswith("sigterm") else [m0] if name.endswith("1") else [m1]
        ended = wait_all(survivors, observe)
        for m in ms:
            ended.setdefault(m.node_rank, (m.proc.poll(), time.time() - t_fault))
        time.sleep(1)  # what the agents leave, a second after they ended
        report(name, ms, ended, t_fault, runs, f"({rdzv} rendezvous; machine 1's workers were {w1})")


def equal(tmp: Path, data: Path, steps: int) -> None:
    """Losses of one process and of two machines (static and c10d rendezvous), same global batch."""
    args = [*shlex.split(TINY), "--data_dir", str(data), "--max_steps", str(steps), "--checkpoint_every", str(steps)]
    one = tmp / "equal" / "one"
    (tmp / "equal").mkdir()
    t0 = time.time()
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--output_dir", str(one)], cwd=ROOT,
                   env=clean_env(), check=True, capture_output=True)  # fmt: skip
    print(f"\n== equal: one process {time.time() - t0:.0f} s")
    for rdzv in ("static", "c10d"):
        run = tmp / "equal" / rdzv
        (tmp / "equal" / f"{rdzv}_logs").mkdir()
        t0 = time.time()
        with machines(2, [*args, "--output_dir", str(run)], tmp / "equal" / f"{rdzv}_logs", rdzv=rdzv) as ms:
            codes = [m.wait(300) for m in ms]
        a, b = losses(one), losses(run)
        diff = max(abs(a[s] - b[s]) for s in a) if a.keys() == b.keys() else None
        info = json.loads((run / "run_info.json").read_text())
        print(f"   two machines, {rdzv} rendezvous: exit codes {codes}, {time.time() - t0:.0f} s, {len(b)} steps, "
              f"max |loss difference| {diff}, num_processes {info['num_processes']}, grad_accum "
              f"{info['grad_accum_steps']}, checkpoints {checkpoints(run)}")  # fmt: skip


SCENARIOS = ["equal", "sigterm_launcher0", "sigterm_launcher1", "sigterm_all", "sigkill_worker1", "sigkill_machine1",
             "sigkill_launcher1", "sigkill_launcher0", "sigkill_machine0", "hang1", "separate_fs"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"some of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--train_args", default="", help="extra train.py options for the fault scenarios")
    parser.add_argument("--observe", type=float, default=90, help="how long to wait for the survivors, s")
    parser.add_argument("--steps", type=int, default=20, help="steps of the equal scenario")
    parser.add_argument(
        "--rdzv", choices=["static", "c10d"], default="static", help="rendezvous of the fault scenarios"
    )
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}: choose from {', '.join(SCENARIOS)}")
    with tempfile.TemporaryDirectory(prefix="two_nodes_") as tmp:
        tmp = Path(tmp)
        data = make_data(tmp / "data")
        for name in args.scenarios or SCENARIOS:
            if name == "equal":
                equal(tmp, data, args.steps)
            else:
                fault_scenario(name, tmp, data, shlex.split(args.train_args), args.observe, args.rdzv)


if __name__ == "__main__":
    main()
