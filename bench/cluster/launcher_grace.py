"""How long each launcher lets its training process live after the launcher itself gets SIGTERM (its "grace"), and
what it exits with. The worker here stands for a trainer that needs longer than any grace to save: it notes when
SIGTERM reaches it, then keeps running until it is killed (or exits 75 after --save_s seconds).

    python bench/cluster/launcher_grace.py                 # every launcher; --save_s 3 for a trainer that saves in 3 s

Printed per launcher: whether SIGTERM reached the worker and after how long, how long the worker lived after the
launcher's SIGTERM (= the grace, when it never exits by itself), how it ended, and the launcher's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve()
PY = sys.executable

WORKER = r"""
import json, os, signal, sys, time
log, save_s = sys.argv[1], float(sys.argv[2])
def note(**kw):
    with open(log, "a") as f:
        f.write(json.dumps({"t": time.time(), "pid": os.getpid(), **kw}) + "\n")
got = []
def on_term(signum, frame):
    got.append(time.time())
    note(event="sigterm")
signal.signal(signal.SIGTERM, on_term)
note(event="start", rank=os.environ.get("RANK"))
while True:
    time.sleep(0.05)
    if got and save_s >= 0 and time.time() - got[0] >= save_s:
        note(event="exit75")
        os._exit(75)
"""


def launchers(script: Path) -> dict[str, list[str]]:
    acc = [PY, "-m", "accelerate.commands.launch"]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone"]
    return {
        "accelerate launch (1 process)": [*acc, "--num_processes", "1", str(script)],
        "accelerate launch --cpu": [*acc, "--cpu", str(script)],
        "torchrun --nproc_per_node 1": [*torchrun, "--nproc_per_node", "1", str(script)],
        "torchrun --nproc_per_node 2": [*torchrun, "--nproc_per_node", "2", str(script)],
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=5 torchrun": [*torchrun, "--nproc_per_node", "1", str(script)],
        "accelerate launch --multi_gpu --num_processes 2 (torchrun inside)": [
            *acc,
            "--multi_gpu",
            "--num_processes",
            "2",
            str(script),
        ],
    }


def measure(name: str, cmd: list[str], log: Path, save_s: float, limit: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "MASTER_"))}
    if name.startswith("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=5"):
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "5"
    log.write_text("")
    proc = subprocess.Popen([*cmd, str(log), str(save_s)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and log.read_text().count('"start"') < (2 if "2" in name.split()[-1] else 1):
        time.sleep(0.05)
    time.sleep(1)
    workers = [json.loads(line)["pid"] for line in log.read_text().splitlines() if '"start"' in line]
    handles = {pid: psutil.Process(pid) for pid in workers}
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    gone: dict[int, float] = {}
    while time.time() - t0 < limit and len(gone) < len(handles):
        for pid, h in handles.items():
            if pid not in gone and (not h.is_running() or h.status() == psutil.STATUS_ZOMBIE):
                gone[pid] = time.time() - t0
        time.sleep(0.02)
    try:
        code = proc.wait(max(1.0, limit - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        code = None
    t_exit = time.time() - t0
    for h in handles.values():  # what is still alive at the limit
        if h.is_running():
            h.kill()
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    got = [round(e["t"] - t0, 2) for e in events if e["event"] == "sigterm"]
    exited75 = [round(e["t"] - t0, 2) for e in events if e["event"] == "exit75"]
    return {
        "launcher": name,
        "sigterm_reached_worker_after_s": got or None,
        "worker_ended_after_s": [round(v, 2) for v in gone.values()] or None,
        "worker_exited_75": bool(exited75),
        "launcher_exit_code": code,
        "launcher_exit_after_s": round(t_exit, 2),
        "launcher_traceback": "Traceback" in err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_s", type=float, default=-1, help="worker exits 75 this long after SIGTERM; -1 never")
    parser.add_argument("--limit", type=float, default=45, help="give up waiting after this long, s")
    parser.add_argument("only", nargs="*", help="launcher names to run (substring)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        for name, cmd in launchers(script).items():
            if args.only and not any(o in name for o in args.only):
                continue
            print(json.dumps(measure(name, cmd, Path(tmp) / "events.jsonl", args.save_s, args.limit)), flush=True)


if __name__ == "__main__":
    main()
