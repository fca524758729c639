"""SIGTERM to exit for train.py's tiny preset (configs/tiny.yaml: 4 x 128, 7.2M parameters), on an idle machine and
with other trainings on the cores: how long the stop takes, and whether it fits in `accelerate launch`'s 5 s.

    python bench/cluster/sigterm_latency.py                 # python and accelerate launch, 0 and 2 other trainings
    python bench/cluster/sigterm_latency.py --load 2 --launchers accelerate --repeats 3

The signal goes to the launcher (accelerate launch --cpu --num_processes 1, which forwards it and kills train.py 5 s
later) or to train.py itself (python train.py: no launcher, no limit), at step --at or later. Printed per run: the
seconds from SIGTERM to the end and to the line saying the checkpoint is complete (what remains after it is the
process's teardown, which a launcher's kill may cut short harmlessly), the step it stopped at, whether the
checkpoint of that step is complete, and the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from machines import clean_env, wait_for_step  # noqa: E402

PY = sys.executable
LAUNCHERS = {"python": [PY], "accelerate": [PY, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]}


def make_data(folder: Path) -> Path:
    from gpt2_repro.data.shards import write_shard
    from synthetic import learnable_tokens

    folder.mkdir(parents=True)
    tokens = learnable_tokens(140000)
    write_shard(folder / "b_val_000000.bin", tokens[:20000])  # the preset evaluates 16,384 tokens
    write_shard(folder / "b_train_000001.bin", tokens[20000:])
    return folder


def preset(data: Path, out: Path, *extra: str) -> list[str]:
    args = [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), "--data_dir", str(data)]
    return [*args, "--hellaswag", "false", "--output_dir", str(out), *extra]


def one(launcher: str, data: Path, tmp: Path, at: int, tag: str) -> dict:
    out = tmp / f"run_{tag}"
    proc = subprocess.Popen([*LAUNCHERS[launcher], *preset(data, out)], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
    lines = []  # (when, line): when the stop message came, not only when the process ended
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in proc.stdout), daemon=True)
    reader.start()
    wait_for_step(out / "metrics.jsonl", at, [proc], timeout=600)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    took = time.time() - t0
    reader.join(timeout=30)
    text = "".join(line for _, line in lines)
    said = [when - t0 for when, line in lines if re.search(r"stopped at step \d+ \(.*\): checkpoint", line)]
    found = re.search(r"stopped at step (\d+) \(.*\): checkpoint (\S+) is complete", text)
    step = int(found.group(1)) if found else None
    complete = bool(found) and (Path(found.group(2)) / "run_state.json").is_file()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
    steps = text.count('"loss"')
    last = max((json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()), default=None)
    return {"launcher": launcher, "sigterm_to_exit_s": round(took, 2), "exit_code": proc.returncode,
            "checkpoint_said_s": round(said[0], 2) if said else None,
            "stopped_at_step": step, "last_logged_step": last, "checkpoint_complete": complete,
            "checkpoints": ckpts, "killed": not found, "_": steps}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=list(LAUNCHERS))
    parser.add_argument("--load", nargs="+", type=int, default=[0, 2], help="other trainings on the cores")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--at", type=int, default=8, help="SIGTERM once this many steps are logged")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sigterm_") as tmp:
        tmp = Path(tmp)
        data = make_data(tmp / "data")
        for load in args.load:
            others = [subprocess.Popen([PY, *preset(data, tmp / f"load{load}_{i}", "--max_steps", "100000")],
                                       cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL) for i in range(load)]  # fmt: skip
            try:
                for i in range(load):
                    wait_for_step(tmp / f"load{load}_{i}" / "metrics.jsonl", 2, [others[i]], timeout=300)
                for launcher in args.launchers:
                    for r in range(args.repeats):
                        result = one(launcher, data, tmp, args.at, f"{launcher}_{load}_{r}")
                        result.pop("_")
                        print(json.dumps({"other_trainings": load, **result}), flush=True)
            finally:
                for p in others:
                    p.kill()
                    p.wait()
            print(f"load average after load {load}: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
