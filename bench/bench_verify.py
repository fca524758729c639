"""What checking the shards' SHA-256 costs at training start-up (shards.verify_shards).

    python bench/bench_verify.py                     # 4 shards of 100M tokens (800 MB), 1 thread vs all cores
    python bench/bench_verify.py --shards 8 --tokens 50_000_000

Writes the shards once (random ids, data_prep's format and manifest), then times verify_shards with one thread and
with one per core (up to 8, what train.py uses), interleaved over --repeats rounds. The files sit in the page
cache after writing, so this is the hashing cost; reading from a cold disk adds the disk's read time. Prints
seconds per 100M-token shard and what the FineWeb-Edu 10B dataset (100 such shards) would take.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_repro.data.shards import MANIFEST, verify_shards, write_shard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tokens", type=lambda s: int(float(s.replace("_", ""))), default=100_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_verify_"))
    rng = np.random.default_rng(0)
    shards = []
    for i in range(args.shards):
        name = f"bench_train_{i + 1:06d}.bin"
        sha = write_shard(work / name, rng.integers(0, 50257, args.tokens, dtype=np.uint16))
        shards.append({"file": name, "tokens": args.tokens, "sha256": sha})
    (work / MANIFEST).write_text(json.dumps({"shards": shards}))
    gb = args.shards * (1024 + 2 * args.tokens) / 1e9
    cores = min(8, os.cpu_count() or 1)
    variants = {"1 thread": 1, f"{cores} threads": cores}
    times = {name: [] for name in variants}
    print(f"# {args.shards} shards x {args.tokens:,} tokens = {gb:.2f} GB, {os.cpu_count()} CPUs")
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            start = time.perf_counter()
            assert verify_shards(work, threads=variants[name]) == []
            times[name].append(time.perf_counter() - start)
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in variants), flush=True)
    per_100m = 1e8 / args.tokens / args.shards
    for name, t in times.items():
        median = statistics.median(t)
        print(
            f"{name}: {gb / median:.2f} GB/s, {median * per_100m:.2f}s per 100M-token shard; "
            f"FineWeb-Edu 10B (100 shards): {median * per_100m * 100:.0f}s"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
