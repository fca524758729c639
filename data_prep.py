"""Tokenize a text dataset into GPT-2 token shards: the offline preparation step (training only reads them).

    python data_prep.py --output_dir data/fineweb-edu-10BT                     # FineWeb-Edu sample-10BT, streamed
    python data_prep.py --output_dir data/edu-5M --max_tokens 5_000_000         # the first 5M tokens only
    python data_prep.py --dataset 'my/corpus/*.parquet' --output_dir data/mine  # local parquet / jsonl / txt

The text comes through text_stream.py (a Hub dataset or local files, tokenized in background threads, EOT before
each document); the shards are token_data.py's format. The first shard (`*_val_000000.bin`) is validation, the rest
(`*_train_000001.bin`, ...) training. `manifest.json` records source, tokenizer, counts, a SHA-256 per shard and,
while a run is unfinished, the point to resume from: the `datasets` stream state before the batch of documents
that crossed the last shard boundary plus how many of that batch's tokens are already written. Rerunning the same
command resumes there, so the finished shards are byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import cli
from atomic_io import is_temporary, write_json_atomic
from cli import ConfigError, opt
from gpt2_tokenizer import EOT_ID, get_gpt2_encoding
from hub import FINEWEB_EDU
from text_stream import (
    RETRIES,
    SHARD_TOKENS,
    VAL_TOKENS,
    StreamReadError,
    cut_shards,
    encoded_batches,
    open_text_stream,
    shard_capacity,
)
from token_data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, DataError, read_shard, write_shard

logger = logging.getLogger("data_prep")

DELIMITER = "eot_before_each_document"


@dataclass
class PrepConfig:
    """Command line of data_prep.py (each field is an option)."""

    output_dir: str = opt(help="folder for the shards and manifest.json")
    dataset: str = opt(
        FINEWEB_EDU, "Hub dataset id, or local parquet/jsonl/txt: a file, a folder or a glob"
    )
    name: str | None = opt(
        None, "dataset config; when unset: sample-10BT for FineWeb-Edu, none for others"
    )
    split: str = opt("train", "dataset split")
    text_column: str = opt("text", "column holding the documents")
    max_tokens: int | None = opt(None, "stop after this many tokens (val + train)")
    shard_tokens: int = opt(SHARD_TOKENS, "tokens per training shard")
    val_tokens: int = opt(VAL_TOKENS, "tokens in the validation shard (the first)")
    num_workers: int = opt(0, "tokenizer threads; 0 = one per CPU core")
    batch_docs: int = opt(512, "documents per tokenizer task")
    text_sample_by: str = opt(
        "document", "plain-text files: one document per 'document' (file), 'paragraph' or 'line'"
    )
    retries: int = opt(
        RETRIES, "retries after a transient read error (waiting 1 s, 2 s, ... up to 60 s)"
    )
    vocab_file: str | None = opt(None, "r50k_base.tiktoken for offline use")
    progress: bool = opt(True, "show a progress bar with tokens/s")


# ----------------------------------------------------------------------------------------------------------------
# Preparation: stream -> shards, resumable


def _default_workers(n: int) -> int:
    return (
        n
        if n > 0
        else len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1
    )


def _differences(old: dict, new: dict, where: str = "") -> list[str]:
    """'key.sub: old there, new now' for every leaf of `new` that differs in `old`."""
    diffs = []
    for key, value in new.items():
        before = old.get(key) if isinstance(old, dict) else None
        if isinstance(value, dict) and isinstance(before, dict):
            diffs += _differences(before, value, f"{where}{key}.")
        elif before != value:
            diffs.append(f"{where}{key}: {before!r} there, {value!r} now")
    return diffs


def _open_manifest(out: Path, identity: dict) -> dict:
    """The manifest to continue (same source and settings), a fresh one, or a DataError that destroys nothing."""
    path = out / "manifest.json"
    if not path.exists():
        foreign = sorted(p.name for ext in ("bin", "npy") for p in out.glob(f"*.{ext}"))
        if foreign:
            raise DataError(
                f"{out} already holds token shards ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
                "but no manifest.json from data_prep.py, so they may come from another source. "
                "Choose an empty --output_dir (nothing was changed)."
            )
        return {"created_by": "data_prep.py", **identity, "complete": False, "shards": []}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}). Choose another --output_dir.") from e
    diffs = _differences(manifest, identity)
    if manifest.get("created_by") != "data_prep.py" or diffs:
        raise DataError(
            f"{out} holds shards of another source or with other settings ({'; '.join(diffs) or 'foreign manifest'}). "
            "Nothing was changed: choose another --output_dir, or rerun with the original options to resume."
        )
    for shard in manifest[
        "shards"
    ]:  # finished shards must still be intact before we continue after them
        path = out / shard["file"]
        if not path.is_file() or len(read_shard(path)) != shard["tokens"]:
            raise DataError(
                f"{path}: missing, or not the {shard['tokens']} tokens manifest.json records. "
                "Rerun into a new --output_dir (nothing was changed)."
            )
    return manifest


def prepare(cfg: PrepConfig) -> dict:
    """Tokenize `cfg.dataset` into shards in `cfg.output_dir` (resuming an unfinished run). Returns the manifest."""
    if (
        cfg.shard_tokens < 1
        or cfg.val_tokens < 1
        or (cfg.max_tokens is not None and cfg.max_tokens < 1)
    ):
        raise DataError("--shard_tokens, --val_tokens and --max_tokens must be positive")
    from tqdm.auto import tqdm

    encoding = get_gpt2_encoding(cfg.vocab_file)
    src = open_text_stream(cfg.dataset, cfg.name, cfg.split, cfg.text_column, cfg.text_sample_by)
    identity = {
        "source": src.identity,
        "tokenizer": {
            "name": "gpt2",
            "encoding": encoding.name,
            "n_vocab": encoding.n_vocab,
            "eot_token": EOT_ID,
        },
        "document_delimiter": DELIMITER,
        "format": {
            "magic": SHARD_MAGIC,
            "version": SHARD_VERSION,
            "header_int32": HEADER_INTS,
            "dtype": "<u2",
        },
        "settings": {
            "val_tokens": cfg.val_tokens,
            "shard_tokens": cfg.shard_tokens,
            "max_tokens": cfg.max_tokens,
        },
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _open_manifest(out, identity)
    if manifest["complete"]:
        logger.info(
            "%s is already complete (%s tokens); nothing to do", out, f"{manifest['tokens']:,}"
        )
        return manifest
    for stale in filter(
        is_temporary, out.iterdir()
    ):  # our own half-written files from an interrupted run
        stale.unlink()

    shards, resume = manifest["shards"], manifest.get("resume")
    written = sum(s["tokens"] for s in shards)
    if resume:
        logger.info(
            "Resuming %s after %d finished shards (%s tokens)", out, len(shards), f"{written:,}"
        )
    skipped = resume["skipped_documents"] if resume else 0

    def capacity(index: int) -> int:
        return shard_capacity(index, cfg.val_tokens, cfg.shard_tokens, cfg.max_tokens)

    def finish_shard(tokens: np.ndarray) -> None:
        nonlocal written
        index = len(shards)
        split = "val" if index == 0 else "train"
        name = f"{src.prefix}_{split}_{index:06d}.bin"
        sha = write_shard(out / name, tokens)
        docs = int(np.count_nonzero(tokens == EOT_ID))  # documents starting in this shard
        shards.append(
            {"file": name, "split": split, "tokens": len(tokens), "documents": docs, "sha256": sha}
        )
        written += len(tokens)

    def counted(batches):
        """The batches, adding each one's skipped documents to `skipped` once it is fully used."""
        nonlocal skipped
        for batch in batches:
            yield batch
            skipped += batch.skipped

    workers = _default_workers(cfg.num_workers)
    buf = np.empty(capacity(len(shards)), dtype=np.uint16)  # the shard being filled
    fill = 0
    start = resume and resume["dataset_state"]  # None: the boundary batch was the stream's first
    stream = encoded_batches(
        src.dataset, cfg.text_column, encoding, workers, cfg.batch_docs, start, cfg.retries
    )
    pieces = cut_shards(
        counted(stream), capacity, len(shards), skip=resume["skip_tokens"] if resume else 0
    )
    desc = f"tokenizing ({workers} threads)"
    bar = tqdm(
        total=cfg.max_tokens,
        initial=written,
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=not cfg.progress,
    )
    try:
        for piece in pieces:
            buf[fill : fill + len(piece.tokens)] = piece.tokens
            fill += len(piece.tokens)
            bar.update(len(piece.tokens))
            bar.set_postfix(shards=len(shards), skipped_docs=skipped, refresh=False)
            if piece.shard_end:
                finish_shard(buf)
                manifest["resume"] = {
                    "dataset_state": piece.batch.state,
                    "skip_tokens": piece.offset + len(piece.tokens),
                    "skipped_documents": skipped,
                }
                write_json_atomic(out / "manifest.json", manifest)
                buf, fill = np.empty(capacity(len(shards)), dtype=np.uint16), 0
    except StreamReadError as e:
        raise StreamReadError(
            f"{e}. Once it can be read again, rerun the same command: it continues after the last "
            f"finished shard ({len(shards)} so far; nothing half-written was kept)."
        ) from e
    finally:
        stream.close()
        bar.close()
    if fill:
        finish_shard(buf[:fill])
    if not shards:
        raise DataError(
            f"{cfg.dataset}: no tokens: every document was empty or not text ({skipped} skipped)"
        )
    if len(shards) == 1:
        logger.warning(
            "Only %s tokens: everything went to the validation shard, none to training",
            f"{written:,}",
        )
    manifest.pop("resume", None)
    manifest.update(
        complete=True,
        tokens=written,
        documents=sum(s["documents"] for s in shards),
        skipped_documents=skipped,
        val_tokens=shards[0]["tokens"],
        train_tokens=written - shards[0]["tokens"],
    )
    write_json_atomic(out / "manifest.json", manifest)
    logger.info(
        "Wrote %d shards, %s tokens, %d documents skipped, to %s",
        len(shards),
        f"{written:,}",
        skipped,
        out,
    )
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = cli.parse(PrepConfig, argv, __doc__.split("\n\n")[0])
        manifest = prepare(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {k: manifest[k] for k in ("tokens", "documents", "skipped_documents")} | asdict(cfg)
        )
    )
    return 0


if __name__ == "__main__":
    # datasets imports torch, when it is installed, for every streamed dataset it makes (to share the epoch with
    # DataLoader workers); preparation uses no torch, and its import is ~2 s of start-up (BENCHMARKS.md).
    os.environ.setdefault("USE_TORCH", "0")
    raise SystemExit(main())
