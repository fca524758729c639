"""Data preparation: a text dataset -> GPT-2 token shards + manifest.json, resumable (what data_prep.py runs).

The text comes through `text_stream.py` (a Hub dataset or local files, tokenized in background threads, EOT before
each document); the shards are `shards.py`'s format. The first shard (`*_val_000000.bin`) is validation, the rest
(`*_train_000001.bin`, ...) training. `manifest.json` records source, tokenizer, counts, a SHA-256 per shard and,
while a run is unfinished, the point to resume from: the `datasets` stream state before the batch of documents
that crossed the last shard boundary plus how many of that batch's tokens are already written. Rerunning the same
command resumes there, so the finished shards are byte-identical to an uninterrupted run.

The manifest also records a fingerprint of the source (local files: size, modification time and a hash of their
first and last MiB; a Hub dataset: the commit it was read at, which a resume reads again), so a resume onto a
changed source is refused. A rerun checks every finished shard against its SHA-256 before trusting it; `verify`
does the same on demand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from ..base.atomic_io import is_temporary, write_json_atomic
from ..base.cli import opt
from ..base.config import READ_RETRIES, SHARD_TOKENS, VAL_TOKENS
from ..base.errors import ConfigError, DataError, StreamReadError
from ..base.lock import LOCK_NAME, RunLock
from ..base.machine import hub_reachable
from ..base.published import FINEWEB_EDU
from .shards import (
    HEADER_INTS,
    MANIFEST,
    SHARD_MAGIC,
    SHARD_VERSION,
    read_manifest,
    shard_capacity,
    val_shard_tokens,
    verify_shards,
    write_shard,
)
from .text_stream import cut_shards, encoded_batches, is_local_source, open_text_stream
from .tokenizer import EOT_ID, get_gpt2_encoding

logger = logging.getLogger(__name__)

DELIMITER = "eot_before_each_document"


@dataclass
class PrepConfig:
    """Command line of data_prep.py (each field is an option)."""

    output_dir: str | None = opt(None, "folder for the shards and manifest.json (required, unless --verify)")
    dataset: str = opt(FINEWEB_EDU, "Hub dataset id, or local parquet/jsonl/txt: a file, a folder or a glob")
    dataset_name: str | None = opt(
        None, "dataset config; when unset: sample-10BT for FineWeb-Edu, none for others", aliases=("name",)
    )
    dataset_split: str = opt("train", "dataset split", aliases=("split",))
    text_column: str = opt("text", "column holding the documents")
    max_tokens: int | None = opt(None, "stop after this many tokens (val + train)")
    shard_tokens: int = opt(SHARD_TOKENS, "tokens per training shard")
    val_tokens: int = opt(
        VAL_TOKENS, "validation tokens: the first shard holds N + 1, so evaluation can score N targets (--val_tokens N)"
    )
    num_workers: int = opt(0, "tokenizer threads; 0 = one per CPU core")
    batch_docs: int = opt(512, "documents per tokenizer task")
    text_sample_by: str = opt("document", "plain-text files: one document per 'document' (file), 'paragraph' or 'line'")
    retries: int = opt(READ_RETRIES, "retries after a transient read error (waiting 1 s, 2 s, ... up to 60 s)")
    vocab_file: str | None = opt(None, "r50k_base.tiktoken for offline use")
    progress: bool = opt(True, "show a progress bar with tokens/s")
    verify: str | None = opt(None, "check the shards in this folder against its manifest.json's SHA-256s, and exit")

    def validate(self) -> None:
        if self.output_dir is None and self.verify is None:
            raise ConfigError("missing required option --output_dir (see --help)")
        if self.num_workers < 0 or self.batch_docs < 1 or self.retries < 0:
            raise ConfigError(
                f"--num_workers {self.num_workers} must be >= 0 (0: one per core), --batch_docs {self.batch_docs} "
                f">= 1 and --retries {self.retries} >= 0"
            )


# ------------------------------------------------------------------------------------- the source and its record


SAMPLE_BYTES = 1 << 20  # hashed at each end of a local source file


def _sample_sha256(path: str) -> str:
    """SHA-256 of the first and last MiB of a file: catches a rewrite that kept the size, without reading it all."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        size = os.fstat(f.fileno()).st_size
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def hub_revision(dataset: str) -> str | None:
    """The commit a Hub dataset's main branch is at now, or None when the Hub cannot be asked (offline)."""
    if not hub_reachable():
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(dataset).sha
    except Exception as e:  # gated, removed, network trouble: the stream itself will say more
        logger.warning("Could not look up the revision of %s: %s", dataset, e)
        return None


def source_fingerprint(files: list[str] | None, revision: str | None) -> dict:
    """Local files: size, modification time and a sample hash of each; a Hub dataset: its commit (may be None)."""
    if files is None:
        return {"revision": revision}
    found = []
    for f in files:
        stat = os.stat(f)
        found.append(
            {"file": f, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample_sha256": _sample_sha256(f)}
        )
    return {"files": found}


def _source_changes(before: dict, now: dict) -> list[str]:
    """How a local source differs from its recorded fingerprint (empty: the same)."""
    old = {f["file"]: f for f in before.get("files") or []}
    new = {f["file"]: f for f in now.get("files") or []}
    changes = [f"{f}: gone" for f in old if f not in new]
    changes += [f"{f}: new" for f in new if f not in old]
    for f in sorted(old.keys() & new.keys()):
        diffs = [k for k in ("bytes", "mtime_ns", "sample_sha256") if old[f][k] != new[f][k]]
        if diffs:
            then, now_ = old[f], new[f]
            what = f"{then['bytes']:,} bytes then, {now_['bytes']:,} now" if "bytes" in diffs else ", ".join(diffs)
            changes.append(f"{f}: changed ({what})")
    revisions = before.get("revision"), now.get("revision")
    if None not in revisions and revisions[0] != revisions[1]:
        changes.append(f"revision {revisions[0]} then, {revisions[1]} now")
    return changes


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


def _open_manifest(out: Path, manifest: dict | None, identity: dict, fingerprint: dict, prefix: str) -> dict:
    """The manifest to continue (same source and settings, finished shards intact), a fresh one, or a DataError
    that changes nothing. `prefix`: the shard files' (a killed run may have left its next shard unrecorded)."""
    if manifest is None:
        foreign = sorted(p.name for ext in ("bin", "npy") for p in out.glob(f"*.{ext}"))
        if foreign:
            raise DataError(
                f"{out} already holds token shards ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
                "but no manifest.json from data_prep.py, so they may come from another source. "
                "Choose an empty --output_dir (nothing was changed)."
            )
        return {
            "created_by": "data_prep.py",
            **identity,
            "source_fingerprint": fingerprint,
            "complete": False,
            "shards": [],
        }
    diffs = _differences(manifest, identity)
    if diffs:
        raise DataError(
            f"{out} holds shards of another source or with other settings ({'; '.join(diffs)}). "
            "Nothing was changed: choose another --output_dir, or rerun with the original options to resume."
        )
    unrecorded = None  # the next shard, written but not yet recorded when the run was killed: redone
    if not manifest["complete"]:
        index = len(manifest["shards"])
        unrecorded = out / f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.bin"
    problems = verify_shards(out, pending=unrecorded and unrecorded.name)  # the set, each shard by its SHA-256
    if problems:
        raise DataError(
            f"{out}: {len(problems)} finished shard(s) do not match manifest.json ({'; '.join(problems[:3])}). "
            "Nothing was changed: prepare the data again into a new --output_dir."
        )
    recorded = manifest.get("source_fingerprint")
    changes = _source_changes(recorded, fingerprint) if recorded else []
    if changes and not manifest["complete"]:
        raise DataError(
            f"The source changed since {out} was started ({'; '.join(changes[:3])}), so continuing would mix old "
            "and new content. Nothing was changed: prepare into a new --output_dir."
        )
    if unrecorded is not None:  # resuming, nothing refused: now it may go
        unrecorded.unlink(missing_ok=True)
    if changes:
        logger.warning("Note: the source changed since these shards were written (%s)", "; ".join(changes[:3]))
    elif recorded is None:
        logger.warning("%s predates source fingerprints: the source cannot be checked", out)
    return manifest


# --------------------------------------------------------------------------------------- refused up front


def check_settings(cfg: PrepConfig) -> None:
    """Positive sizes, a validation share that leaves tokens for training, shards that fit in memory."""
    if cfg.shard_tokens < 1 or cfg.val_tokens < 1 or (cfg.max_tokens is not None and cfg.max_tokens < 1):
        raise DataError("--shard_tokens, --val_tokens and --max_tokens must be positive")
    if cfg.max_tokens is not None and val_shard_tokens(cfg.val_tokens) >= cfg.max_tokens:
        raise DataError(
            f"--val_tokens {cfg.val_tokens:,} takes all of --max_tokens {cfg.max_tokens:,}: nothing would be left "
            f"for training. Pass a smaller --val_tokens (e.g. {max(1, cfg.max_tokens // 10):,})."
        )
    largest = max(val_shard_tokens(cfg.val_tokens), cfg.shard_tokens)
    if cfg.max_tokens is not None:
        largest = min(largest, cfg.max_tokens)
    available = psutil.virtual_memory().available
    if 2 * largest > available:  # one shard is assembled in memory (uint16) before it is written
        raise DataError(
            f"a shard of {largest:,} tokens needs {2 * largest / 2**30:.1f} GiB of memory while it is filled, and "
            f"{available / 2**30:.1f} GiB are available. Pass a smaller --shard_tokens / --val_tokens (the default "
            "100,000,000 needs 0.2 GiB)."
        )


def _new_buffer(tokens: int) -> np.ndarray:
    try:
        return np.empty(tokens, dtype=np.uint16)
    except MemoryError:
        raise DataError(
            f"cannot allocate a shard of {tokens:,} tokens ({2 * tokens / 2**30:.1f} GiB). Pass a smaller "
            "--shard_tokens / --val_tokens."
        ) from None


# ------------------------------------------------------------------------------------------------ preparation


def prepare(cfg: PrepConfig) -> dict:
    """Tokenize `cfg.dataset` into shards in `cfg.output_dir` (resuming an unfinished run). Returns the manifest.

    One preparation at a time per folder: a second one is refused at once (the folder's lock, as training's). A
    failure leaves the finished shards and the manifest as they were (a rerun continues after them) and no
    temporary file; a folder this call created and left empty is removed.
    """
    check_settings(cfg)
    out = Path(cfg.output_dir)
    created, lock_existed = not out.exists(), (out / LOCK_NAME).exists()
    lock = RunLock(out, user="preparation", contents="shards (each run would record only its own in manifest.json)")
    try:
        lock.acquire()
        if lock.warning:
            logger.warning(lock.warning)
        return _prepare(cfg, out)
    except BaseException:
        if out.is_dir():
            for stale in filter(is_temporary, out.iterdir()):
                stale.unlink(missing_ok=True)
            if not lock_existed and [p.name for p in out.iterdir()] == [LOCK_NAME]:  # as it was: nothing of ours
                lock.release()
                (out / LOCK_NAME).unlink()
                if created:
                    out.rmdir()
        raise
    finally:
        lock.release()


def _prepare(cfg: PrepConfig, out: Path) -> dict:
    encoding, src, manifest = _open(cfg, out)
    if manifest["complete"]:
        tokens = f"{manifest['tokens']:,}"
        logger.info("%s is already complete (%s tokens, every shard matches its SHA-256); nothing to do", out, tokens)
        return manifest
    for stale in filter(is_temporary, out.iterdir()):  # our own half-written files from an interrupted run
        stale.unlink()
    writer = ShardWriter(out, src.prefix, manifest)
    if manifest.get("resume"):
        logger.info("Resuming %s after %d finished shards (%s tokens)", out, len(writer.shards), f"{writer.written:,}")
    rest = _write_shards(cfg, src, encoding, writer)
    shards, skipped = writer.shards, writer.skipped
    if not shards and not len(rest):
        raise DataError(f"{cfg.dataset}: no tokens: every document was empty or not text ({skipped} skipped)")
    if len(shards) + bool(len(rest)) < 2:  # the validation shard took everything
        total = writer.written + len(rest)
        raise DataError(
            f"{cfg.dataset} holds only {total:,} tokens and --val_tokens is {cfg.val_tokens:,}: nothing would be "
            f"left for training. Rerun with a smaller --val_tokens (e.g. {max(1, total // 10):,})"
            + (" into a new --output_dir." if shards else " (nothing was written).")
        )
    if len(rest):
        writer.finish(rest)
    return writer.complete()


def _open(cfg: PrepConfig, out: Path):
    """(tokenizer, text source, manifest): the manifest to continue, or a new one; refused when they disagree."""
    encoding = get_gpt2_encoding(cfg.vocab_file)
    recorded = read_manifest(out) if out.is_dir() else None
    # A Hub dataset is read at one commit: the one a resumed run started at, else main's newest.
    revision = ((recorded or {}).get("source_fingerprint") or {}).get("revision")
    if revision is None and not is_local_source(cfg.dataset):
        revision = hub_revision(cfg.dataset)
    src = open_text_stream(
        cfg.dataset, cfg.dataset_name, cfg.dataset_split, cfg.text_column, cfg.text_sample_by, revision
    )
    identity = {
        "source": src.identity,
        "tokenizer": {"name": "gpt2", "encoding": encoding.name, "n_vocab": encoding.n_vocab, "eot_token": EOT_ID},
        "document_delimiter": DELIMITER,
        "format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_int32": HEADER_INTS, "dtype": "<u2"},
        "settings": {"val_tokens": cfg.val_tokens, "shard_tokens": cfg.shard_tokens, "max_tokens": cfg.max_tokens},
    }
    fingerprint = source_fingerprint(src.files, None if src.files else revision)
    out.mkdir(parents=True, exist_ok=True)
    return encoding, src, _open_manifest(out, recorded, identity, fingerprint, src.prefix)


class ShardWriter:
    """The finished shards of one preparation: each written whole, then recorded in manifest.json together with
    the point to resume from, so an interruption loses at most the shard being filled."""

    def __init__(self, out: Path, prefix: str, manifest: dict):
        self.out, self.prefix, self.manifest = out, prefix, manifest
        self.shards = manifest["shards"]
        self.written = sum(s["tokens"] for s in self.shards)
        self.skipped = (manifest.get("resume") or {}).get("skipped_documents", 0)  # empty or non-text documents

    def finish(self, tokens: np.ndarray) -> None:
        """Write the next shard (validation first, then training)."""
        index = len(self.shards)
        split = "val" if index == 0 else "train"
        name = f"{self.prefix}_{split}_{index:06d}.bin"
        sha = write_shard(self.out / name, tokens)
        docs = int(np.count_nonzero(tokens == EOT_ID))  # documents starting in this shard
        self.shards.append({"file": name, "split": split, "tokens": len(tokens), "documents": docs, "sha256": sha})
        self.written += len(tokens)

    def save_resume_point(self, piece) -> None:
        """Record where the stream goes on after the shard that `piece` (a text_stream.Piece) completed."""
        skip = piece.offset + len(piece.tokens)
        self.manifest["resume"] = {
            "dataset_state": piece.batch.state,
            "skip_tokens": skip,
            "skipped_documents": self.skipped,
        }
        write_json_atomic(self.out / MANIFEST, self.manifest)

    def complete(self) -> dict:
        """Mark the preparation complete, with its totals. Returns the manifest."""
        shards, manifest = self.shards, self.manifest
        manifest.pop("resume", None)
        manifest.update(
            complete=True,
            tokens=self.written,
            documents=sum(s["documents"] for s in shards),
            skipped_documents=self.skipped,
            val_tokens=shards[0]["tokens"],
            train_tokens=self.written - shards[0]["tokens"],
        )
        write_json_atomic(self.out / MANIFEST, manifest)
        logger.info(
            "Wrote %d shards, %s tokens, %d documents skipped, to %s",
            len(shards),
            f"{self.written:,}",
            self.skipped,
            self.out,
        )
        return manifest


def _write_shards(cfg: PrepConfig, src, encoding, writer: ShardWriter) -> np.ndarray:
    """Tokenize the stream from the manifest's resume point into shards; returns the tokens of a last, unfinished
    shard (the stream ended before it was full)."""
    from tqdm.auto import tqdm

    resume = writer.manifest.get("resume")

    def capacity(index: int) -> int:
        return shard_capacity(index, cfg.val_tokens, cfg.shard_tokens, cfg.max_tokens)

    def counted(batches):
        """The batches, adding each one's skipped documents to the count once it is fully used."""
        for batch in batches:
            yield batch
            writer.skipped += batch.skipped

    workers = _default_workers(cfg.num_workers)
    buf, fill = _new_buffer(capacity(len(writer.shards))), 0  # the shard being filled
    start = resume and resume["dataset_state"]  # None: the boundary batch was the stream's first
    stream = encoded_batches(src.dataset, cfg.text_column, encoding, workers, cfg.batch_docs, start, cfg.retries)
    pieces = cut_shards(counted(stream), capacity, len(writer.shards), skip=resume["skip_tokens"] if resume else 0)
    desc = f"tokenizing ({workers} threads)"
    bar = tqdm(
        total=cfg.max_tokens, initial=writer.written, unit="tok", unit_scale=True, desc=desc, disable=not cfg.progress
    )
    try:
        for piece in pieces:
            buf[fill : fill + len(piece.tokens)] = piece.tokens
            fill += len(piece.tokens)
            bar.update(len(piece.tokens))
            bar.set_postfix(shards=len(writer.shards), skipped_docs=writer.skipped, refresh=False)
            if piece.shard_end:
                writer.finish(buf)
                writer.save_resume_point(piece)
                buf, fill = _new_buffer(capacity(len(writer.shards))), 0
    except StreamReadError as e:
        kept = f"({len(writer.shards)} so far; nothing half-written was kept)"
        if not e.transient:
            raise StreamReadError(
                f"{e}. Retrying cannot mend this: the data itself cannot be read. Fix it, then rerun the same "
                f"command to continue after the last finished shard {kept}, or prepare into a new --output_dir.",
                transient=False,
            ) from e
        raise StreamReadError(
            f"{e}. Once it can be read again, rerun the same command: it continues after the last finished shard "
            f"{kept}."
        ) from e
    finally:
        stream.close()
        bar.close()
    return buf[:fill]


def _default_workers(n: int) -> int:
    return n if n > 0 else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def verify(folder: str) -> dict:
    """`--verify DIR`: every shard manifest.json lists against its size and SHA-256; DataError on any mismatch."""
    out = Path(folder)
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None:
        raise DataError(f"{out}: no manifest.json from data_prep.py, so nothing to verify the shards against.")
    start = time.perf_counter()
    problems = verify_shards(out)
    if problems:
        raise DataError(
            f"{out}: {len(problems)} of {len(manifest['shards'])} shard(s) do not match manifest.json: "
            + "; ".join(problems)
            + ". Prepare the data again into a new --output_dir (or restore these files)."
        )
    done = "complete" if manifest["complete"] else "incomplete (rerun data_prep.py to finish it)"
    tokens = sum(s["tokens"] for s in manifest["shards"])
    logger.info(
        "%s: all %d shards match manifest.json (%s tokens, %.1fs); the dataset is %s",
        out,
        len(manifest["shards"]),
        f"{tokens:,}",
        time.perf_counter() - start,
        done,
    )
    return manifest
