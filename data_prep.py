"""Tokenize a text dataset into GPT-2 token shards: the offline preparation step (training only reads them).

    python data_prep.py --output_dir data/fineweb-edu-10BT                     # FineWeb-Edu sample-10BT, streamed
    python data_prep.py --output_dir data/edu-5M --max_tokens 5_000_000         # the first 5M tokens only
    python data_prep.py --dataset 'my/corpus/*.parquet' --output_dir data/mine  # local parquet / jsonl / txt
    python data_prep.py --verify data/fineweb-edu-10BT                          # every shard against its SHA-256

The first shard (`*_val_000000.bin`) is validation, the rest (`*_train_000001.bin`, ...) training; manifest.json
records the source, the tokenizer, the counts and a SHA-256 per shard. Interrupted, the same command continues after
the last finished shard, with byte-identical results (gpt2_repro/prepare.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import asdict
from pathlib import Path

from gpt2_repro.base import cli
from gpt2_repro.base.errors import Stop


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM too unwinds, so temporary files are removed on the way out


def main(argv: list[str] | None = None) -> dict:
    from gpt2_repro.data.prepare import PrepConfig, prepare, verify
    from gpt2_repro.data.shards import read_manifest

    logging.basicConfig(format="%(message)s")  # the libraries' own notices stay at their default: warnings
    logging.getLogger("gpt2_repro").setLevel(logging.INFO)
    cfg = cli.parse(PrepConfig, argv, __doc__.split("\n\n")[0])
    if cfg.verify is not None:
        return verify(cfg.verify)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        manifest = prepare(cfg)
    except KeyboardInterrupt:
        done = (read_manifest(Path(cfg.output_dir)) or {}).get("shards", [])
        hint = (
            f"{len(done)} finished shard(s) kept: rerun the same command to continue after them"
            if done
            else "no shard was finished: rerun the same command to start over"
        )
        raise Stop(f"interrupted: {hint}", 130) from None
    print(json.dumps({k: manifest[k] for k in ("tokens", "documents", "skipped_documents")} | asdict(cfg)))
    return manifest


if __name__ == "__main__":
    # datasets imports torch, when it is installed, for every streamed dataset it makes (to share the epoch with
    # DataLoader workers); preparation uses no torch, and its import is ~2 s of start-up (BENCHMARKS.md).
    os.environ.setdefault("USE_TORCH", "0")
    cli.run(main)
