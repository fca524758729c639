"""How long train.py takes to answer when it has nothing to train: `--help`, a config error, a second run into a
folder in use. The current tree against another revision (a git worktree of it), interleaved, median of N.

    python bench/bench_startup.py --before ad06fae --repeats 5

Each case is a whole process (`python train.py ...`), timed from launch to exit; the import cost of each is also
measured once with `python -X importtime` (the sum of the self times it lists, in seconds). The lock for the third
case is held by a helper process for the whole benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cases(data: Path, busy: Path) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "config error (--max_lr -1)": ["--max_lr", "-1", "--data_dir", str(data)],
        "second run into a folder in use": [
            "--config",
            "configs/tiny.yaml",
            "--data_dir",
            str(data),
            "--output_dir",
            str(busy),
        ],
    }


def run_once(tree: Path, args: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=tree, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode


def import_seconds(tree: Path, args: list[str]) -> float:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", *args], cwd=tree, capture_output=True, text=True
    )
    total = 0
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            field = line.split(":", 1)[1].split("|")[0].strip()
            total += int(field) if field.isdigit() else 0
    return total / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision to compare with (a worktree of it is made)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old), args.before], cwd=ROOT, check=True, capture_output=True
        )
        try:
            data = tmp / "shards"  # a minimal prepared folder: the refusals come before the data is read in full
            sys.path[:0] = [str(ROOT)]
            import numpy as np

            from gpt2_repro.data.shards import write_shard

            data.mkdir()
            write_shard(data / "x_val_000000.bin", np.arange(40000) % 50000)
            write_shard(data / "x_train_000001.bin", np.arange(40000) % 50000)
            busy = tmp / "busy"
            holder = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys, time, fcntl, os; os.makedirs(sys.argv[1], exist_ok=True); "
                    "fd = os.open(sys.argv[1] + '/.lock', os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
                    "print('locked', flush=True); time.sleep(3600)",
                    str(busy),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert holder.stdout.readline().strip() == "locked"
            print("| case | before: s (import s) | now: s (import s) | speed-up | exit codes |\n|---|---|---|---|---|")
            for name, case in cases(data, busy).items():
                times = {"before": [], "now": []}
                codes = set()
                for _ in range(args.repeats):  # interleaved, so machine load hits both alike
                    for label, tree in (("before", old), ("now", ROOT)):
                        seconds, code = run_once(tree, case)
                        times[label].append(seconds)
                        codes.add((label, code))
                b, n = statistics.median(times["before"]), statistics.median(times["now"])
                ib, inow = import_seconds(old, case), import_seconds(ROOT, case)
                exits = ", ".join(f"{label} {code}" for label, code in sorted(codes))
                print(f"| {name} | {b:.2f} ({ib:.2f}) | {n:.2f} ({inow:.2f}) | {b / n:.1f}x | {exits} |", flush=True)
            holder.kill()
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()
