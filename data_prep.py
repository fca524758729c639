"""Tokenize a text dataset into GPT-2 token shards, and the loaders that feed them to training.

    python data_prep.py --output_dir data/fineweb-edu-10BT                     # FineWeb-Edu sample-10BT, streamed
    python data_prep.py --output_dir data/edu-5M --max_tokens 5_000_000         # the first 5M tokens only
    python data_prep.py --dataset 'my/corpus/*.parquet' --output_dir data/mine  # local parquet / jsonl / txt

Shards use the llm.c / modded-nanogpt layout: a header of 256 little-endian int32 (magic 20240520, version 1,
token count, zeros) followed by the tokens as little-endian uint16. The first shard (`*_val_000000.bin`) is
validation, the rest (`*_train_000001.bin`, ...) training. Every document is preceded by the end-of-text token
50256 (the convention of build-nanogpt's and llm.c's fineweb.py: EOT *before* each document).
`manifest.json` records source, tokenizer, counts, a SHA-256 per shard and, while a run is unfinished, the point to
resume from: the `datasets` stream state before the batch of documents that crossed the last shard boundary plus
how many of that batch's tokens are already written. Rerunning the same command resumes there, so the finished
shards are byte-identical to an uninterrupted run.

`TokenShardLoader` serves (B, T) training batches from those shards (or build-nanogpt's `.npy` shards) by memory
map; `iter_val_batches` serves a fixed validation budget; `StreamingTokenLoader` trains straight from a stream.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
import torch

from checkpointing import write_json_atomic
from gpt2_tokenizer import EOT_ID, get_gpt2_encoding

logger = logging.getLogger("data_prep")

SHARD_MAGIC = 20240520  # llm.c's magic for token shards
SHARD_VERSION = 1  # version 1 = GPT-2 uint16 tokens (llm.c's version 2 holds uint32 LLaMA-3 tokens)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_CONFIGS = {DEFAULT_DATASET: "sample-10BT"}  # the config used when --name is not given
LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
DELIMITER = "eot_before_each_document"


class DataError(ValueError):
    """Bad input data or output folder; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Shard files


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write `tokens` (1-D, values < 65536) as an llm.c shard, atomically (temp name + rename). Returns its SHA-256."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {tokens.shape}")
    if tokens.dtype != np.uint16:
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"write_shard({path}): token ids must be in [0, 65535] to fit uint16")
        tokens = tokens.astype(np.uint16)
    tokens = tokens.astype("<u2", copy=False)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for part in (header.data, tokens.data):
            f.write(part)
            digest.update(part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a token shard as uint16: an llm.c `.bin` (header validated) or a build-nanogpt `.npy`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Token shard not found: {path}")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: unreadable .npy shard ({type(e).__name__}: {e}); re-create it") from e
        if arr.dtype != np.uint16 or arr.ndim != 1:
            raise DataError(f"{path}: expected a 1-D uint16 token array, found {arr.dtype} of shape {arr.shape}")
        return arr
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(
            f"{path}: truncated or not a token shard: {size} bytes, less than the {HEADER_BYTES}-byte header"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: not an llm.c token shard (magic {header[0]}, expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise DataError(
            f"{path}: shard version {header[1]}, expected {SHARD_VERSION} (GPT-2 uint16 tokens); "
            "version 2 shards hold uint32 tokens of another tokenizer"
        )
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: the header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
            "delete it and rerun data_prep.py to rewrite it"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def find_shards(data_dir_or_glob: str | os.PathLike, split: str) -> list[Path]:
    """The `split` shard files: `DIR/*_{split}_*.bin|.npy`, or the .bin/.npy files a glob matches with `_{split}_`."""
    spec = str(data_dir_or_glob)
    if Path(spec).is_dir():
        files = [p for ext in ("bin", "npy") for p in Path(spec).glob(f"*_{split}_*.{ext}")]
    elif Path(spec).is_file():
        return [Path(spec)]
    else:
        files = [Path(p) for p in globlib.glob(os.path.expanduser(spec)) if f"_{split}_" in Path(p).name]
        files = [p for p in files if p.suffix in (".bin", ".npy")]
    if not files:
        raise FileNotFoundError(
            f"No {split} shards (*_{split}_*.bin or *_{split}_*.npy) found at {spec}. "
            f"Prepare them with: python data_prep.py --output_dir {spec}"
        )
    return sorted(files)


# ----------------------------------------------------------------------------------------------------------------
# Configuration (the command line is generated from it)


@dataclass(kw_only=True)
class PrepConfig:
    output_dir: str = field(metadata={"help": "folder for the shards and manifest.json"})
    dataset: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Hub dataset id, or local parquet/jsonl/txt: a file, a folder or a glob"},
    )
    name: str | None = field(
        default=None,
        metadata={"help": "dataset config; when unset: sample-10BT for FineWeb-Edu, none for other datasets"},
    )
    split: str = "train"
    text_column: str = "text"
    max_tokens: int | None = field(default=None, metadata={"help": "stop after this many tokens (val + train)"})
    shard_tokens: int = field(default=100_000_000, metadata={"help": "tokens per training shard"})
    val_tokens: int = field(default=100_000_000, metadata={"help": "tokens in the validation shard (the first)"})
    num_workers: int = field(default=0, metadata={"help": "tokenizer threads; 0 = one per CPU core"})
    batch_docs: int = field(default=512, metadata={"help": "documents per tokenizer task"})
    text_sample_by: str = field(
        default="document",
        metadata={"help": "plain-text files: one document per 'document' (file), 'paragraph' or 'line'"},
    )
    vocab_file: str | None = field(default=None, metadata={"help": "r50k_base.tiktoken for offline use"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar with tokens/s"})


# ----------------------------------------------------------------------------------------------------------------
# The text stream: Hub datasets and local files through the same `datasets.load_dataset(..., streaming=True)`


@dataclass
class TextSource:
    dataset: object  # datasets.IterableDataset holding only the text column
    identity: dict  # what the manifest records and a rerun must match
    prefix: str  # shard file prefix, e.g. "fineweb-edu"
    files: list[str] | None  # local files, None for a Hub dataset


def _local_files(spec: str) -> list[str] | None:
    """The files a local path/folder/glob names, or None when `spec` looks like a Hub id."""
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        files = [p for p in globlib.glob(str(path), recursive=True) if Path(p).is_file()]
        if not files:
            raise FileNotFoundError(f"--dataset {spec}: no file matches this glob")
    elif path.is_dir():
        files = [str(p) for p in path.rglob("*") if p.is_file() and _builder_of(p.name) and not p.name.startswith(".")]
        if not files:
            raise FileNotFoundError(f"--dataset {spec}: the folder holds no {sorted(LOCAL_BUILDERS)} files")
    elif path.is_file():
        files = [str(path)]
    elif spec.startswith(("/", ".", "~")) or _builder_of(spec) or spec.count("/") > 1:
        raise FileNotFoundError(f"--dataset {spec}: no such file or folder (and it is not a Hub dataset id)")
    else:
        return None
    return sorted(str(Path(f).resolve()) for f in files)


def _builder_of(name: str) -> str | None:
    name = name.lower()
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return LOCAL_BUILDERS.get(Path(name).suffix)


def _check_readable(files: list[str], builder: str) -> None:
    """Open every local file up front so that an unreadable one is named before any shard is written."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            if builder == "parquet":
                pq.ParquetFile(f).close()
            else:
                with open(f, "rb") as fh:
                    fh.read(1)
        except Exception as e:
            raise DataError(f"Cannot read {f}: {type(e).__name__}: {e}. Fix or remove the file.") from e


def open_text_stream(
    dataset: str,
    name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    text_sample_by: str = "document",
) -> TextSource:
    """Open a Hub dataset or local files as a streaming `datasets.IterableDataset` of the text column."""
    import datasets

    files = _local_files(dataset)
    if files is None:
        name = name or DEFAULT_CONFIGS.get(dataset)
        ident = {"dataset": dataset, "name": name, "split": split, "text_column": text_column}
        prefix = dataset.rsplit("/", 1)[-1]
        try:
            ds = datasets.load_dataset(dataset, name, split=split, streaming=True)
        except Exception as e:  # DatasetNotFoundError, ConnectionError (offline), ValueError (config/split)
            raise DataError(
                f"Could not open dataset {dataset!r} (config {name!r}, split {split!r}): {type(e).__name__}: {e}. "
                f"Check the id, --name and --split on https://huggingface.co/datasets/{dataset}; offline, pass "
                "local files instead (--dataset path/to/*.parquet, *.jsonl or *.txt, or a folder)."
            ) from e
    else:
        builders = {_builder_of(f) for f in files}
        if None in builders or len(builders) > 1:
            kinds = sorted({Path(f).suffix or "(none)" for f in files})
            raise DataError(
                f"--dataset {dataset}: files must be all parquet, all jsonl/json or all txt; found suffixes {kinds}"
            )
        builder = builders.pop()
        _check_readable(files, builder)
        if split != "train":
            raise DataError(f"--dataset {dataset}: local files form the single split 'train', not {split!r}")
        kwargs = {"sample_by": text_sample_by} if builder == "text" else {}
        ident = {"dataset": dataset, "builder": builder, "data_files": files, "split": "train"}
        ident.update(text_column=text_column, **kwargs)
        prefix = Path(files[0]).stem.split(".")[0] if len(files) == 1 else Path(os.path.commonpath(files)).name
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        except Exception as e:
            raise DataError(f"Could not open {dataset} as {builder}: {type(e).__name__}: {e}") from e
    columns = ds.column_names or _peek_columns(ds, dataset)
    if text_column not in columns:
        raise DataError(
            f"{dataset}: no column {text_column!r}; the columns are {columns}. Pass --text_column with one of them."
        )
    feature = (ds.features or {}).get(text_column)
    if feature is not None and getattr(feature, "dtype", "string") not in ("string", "large_string"):
        raise DataError(f"{dataset}: column {text_column!r} holds {feature}, not text. Pass --text_column.")
    prefix = re.sub(r"[^A-Za-z0-9.-]+", "-", prefix).strip("-.").lower() or "data"
    return TextSource(ds.select_columns([text_column]), ident, prefix, files)


def _peek_columns(ds, dataset: str) -> list[str]:
    """Columns of a stream whose features are unknown (e.g. jsonl), from its first example."""
    try:
        return list(next(iter(ds)).keys())
    except StopIteration:
        raise DataError(f"{dataset}: the dataset is empty") from None
    except Exception as e:
        raise DataError(f"Could not read {dataset}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# Tokenization
#
# Threads, not processes: tiktoken's Rust encoder releases the GIL, so threads tokenize in parallel without pickling
# text or tokens, and without fork/spawn (build-nanogpt's multiprocessing preparation breaks on some platforms).
# One catch, measured: an Encoding costs ~30% more CPU per token in every thread but the first that used it (its
# regex caches take a shared slow path for other threads), so each tokenizer thread builds its own copy (~40 ms,
# ~10 MB). bench/bench_data.py (20 MB of text, 2 CPU cores shared with other jobs, load 3-5), CPU seconds per
# million tokens: one thread with the shared Encoding 0.226, with its own copy 0.170 (main thread 0.171); whole
# pipelines: data_prep's threads 0.200, the same document batches in a 2-process Pool 0.233, build-nanogpt's Pool
# over single documents 0.314. `encode_to_numpy` also skips building a Python list (~12% less CPU than
# `encode_ordinary`).

_own_encoding = threading.local()


def _thread_copy(encoding):
    """This thread's own copy of `encoding` (see above)."""
    mine = getattr(_own_encoding, "pair", None)
    if mine is None or mine[0] is not encoding:
        copy = tiktoken.Encoding(
            name=encoding.name,
            pat_str=encoding._pat_str,
            mergeable_ranks=encoding._mergeable_ranks,
            special_tokens=encoding._special_tokens,
        )
        _own_encoding.pair = mine = (encoding, copy)
    return mine[1]


_EOT_ARRAY = np.array([EOT_ID], dtype=np.uint32)


def encode_documents(encoding, texts: list) -> tuple[np.ndarray, int]:
    """Tokenize documents into one uint16 array, EOT before each. Returns (tokens, number of skipped documents).

    Documents that are not strings or are empty/whitespace-only are skipped and counted. Text such as
    "<|endoftext|>" inside a document is encoded as ordinary text, so 50256 only ever marks a document start.
    """
    encoding = _thread_copy(encoding)
    parts, skipped = [], 0
    for text in texts:
        if not isinstance(text, str) or not text or text.isspace():
            skipped += 1
            continue
        try:
            ids = encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: replace them, as tiktoken's encode_ordinary does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = encoding.encode_to_numpy(text, disallowed_special=())
        parts += (_EOT_ARRAY, ids)
    if not parts:
        return np.zeros(0, dtype=np.uint16), skipped
    return np.concatenate(parts).astype(np.uint16), skipped


def encoded_batches(
    ds,
    column: str,
    encoding,
    num_workers: int,
    batch_docs: int,
    start_state: dict | None = None,
) -> Iterator[tuple[dict | None, np.ndarray, int]]:
    """Yield (stream state before the batch, tokens, skipped documents) for consecutive batches of documents.

    The main thread reads the stream (so its `state_dict()` stays exact) while `num_workers` workers tokenize up to
    2 * num_workers batches ahead. `start_state` (None = the start) is the state the stream was loaded at.
    """
    state = start_state
    batches = ds.iter(batch_size=batch_docs)
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="tokenizer")
    pending: deque = deque()
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < 2 * num_workers:
                try:
                    batch = next(batches)
                except StopIteration:
                    exhausted = True
                    break
                except Exception as e:
                    raise DataError(f"Reading the dataset failed: {type(e).__name__}: {e}") from e
                pending.append((state, pool.submit(encode_documents, encoding, batch[column])))
                state = ds.state_dict()
            if not pending:
                return
            batch_state, future = pending.popleft()
            yield (batch_state, *future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------------
# Preparation: stream -> shards, resumable


def _default_workers(n: int) -> int:
    return n if n > 0 else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    for shard in manifest["shards"]:  # finished shards must still be intact before we continue after them
        path = out / shard["file"]
        if not path.is_file() or len(read_shard(path)) != shard["tokens"]:
            raise DataError(
                f"{path}: missing, or not the {shard['tokens']} tokens manifest.json records. "
                "Rerun into a new --output_dir (nothing was changed)."
            )
    return manifest


def prepare(cfg: PrepConfig) -> dict:
    """Tokenize `cfg.dataset` into shards in `cfg.output_dir` (resuming an unfinished run). Returns the manifest."""
    if cfg.shard_tokens < 1 or cfg.val_tokens < 1 or (cfg.max_tokens is not None and cfg.max_tokens < 1):
        raise DataError("--shard_tokens, --val_tokens and --max_tokens must be positive")
    from tqdm.auto import tqdm

    encoding = get_gpt2_encoding(cfg.vocab_file)
    src = open_text_stream(cfg.dataset, cfg.name, cfg.split, cfg.text_column, cfg.text_sample_by)
    identity = {
        "source": src.identity,
        "tokenizer": {"name": "gpt2", "encoding": encoding.name, "n_vocab": encoding.n_vocab, "eot_token": EOT_ID},
        "document_delimiter": DELIMITER,
        "format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_int32": HEADER_INTS, "dtype": "<u2"},
        "settings": {"val_tokens": cfg.val_tokens, "shard_tokens": cfg.shard_tokens, "max_tokens": cfg.max_tokens},
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _open_manifest(out, identity)
    if manifest["complete"]:
        logger.info("%s is already complete (%s tokens); nothing to do", out, f"{manifest['tokens']:,}")
        return manifest
    for stale in out.glob("*.tmp"):  # our own half-written files from an interrupted run
        stale.unlink()

    shards, resume = manifest["shards"], manifest.get("resume")
    written = sum(s["tokens"] for s in shards)
    if resume:
        logger.info("Resuming %s after %d finished shards (%s tokens)", out, len(shards), f"{written:,}")
        if resume["dataset_state"] is not None:  # None: the boundary batch was the stream's first
            src.dataset.load_state_dict(resume["dataset_state"])
    skipped = resume["skipped_documents"] if resume else 0

    def capacity(index: int) -> int:
        size = cfg.val_tokens if index == 0 else cfg.shard_tokens
        return size if cfg.max_tokens is None else min(size, cfg.max_tokens - written)

    def finish_shard(tokens: np.ndarray) -> None:
        nonlocal written
        index = len(shards)
        split = "val" if index == 0 else "train"
        name = f"{src.prefix}_{split}_{index:06d}.bin"
        sha = write_shard(out / name, tokens)
        docs = int(np.count_nonzero(tokens == EOT_ID))  # documents starting in this shard
        shards.append({"file": name, "split": split, "tokens": len(tokens), "documents": docs, "sha256": sha})
        written += len(tokens)

    workers = _default_workers(cfg.num_workers)
    buf = np.empty(capacity(len(shards)), dtype=np.uint16)  # the shard being filled
    fill = 0
    start = resume and resume["dataset_state"]
    stream = encoded_batches(src.dataset, cfg.text_column, encoding, workers, cfg.batch_docs, start)
    desc = f"tokenizing ({workers} threads)"
    bar = tqdm(total=cfg.max_tokens, initial=written, unit="tok", unit_scale=True, desc=desc, disable=not cfg.progress)
    try:
        for i, (state, tokens, n_skipped) in enumerate(stream):
            pos = resume["skip_tokens"] if (resume and i == 0) else 0  # tokens of this batch already in shards
            while pos < len(tokens) and len(buf):
                take = min(len(buf) - fill, len(tokens) - pos)
                buf[fill : fill + take] = tokens[pos : pos + take]
                fill, pos = fill + take, pos + take
                bar.update(take)
                if fill == len(buf):
                    finish_shard(buf)
                    manifest["resume"] = {"dataset_state": state, "skip_tokens": pos, "skipped_documents": skipped}
                    write_json_atomic(out / "manifest.json", manifest)
                    buf, fill = np.empty(capacity(len(shards)), dtype=np.uint16), 0
            skipped += n_skipped
            bar.set_postfix(shards=len(shards), skipped_docs=skipped, refresh=False)
            if not len(buf):  # --max_tokens reached
                break
    finally:
        stream.close()
        bar.close()
    if fill:
        finish_shard(buf[:fill])
    if not shards:
        raise DataError(f"{cfg.dataset}: no tokens: every document was empty or not text ({skipped} skipped)")
    if len(shards) == 1:
        logger.warning("Only %s tokens: everything went to the validation shard, none to training", f"{written:,}")
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
    logger.info("Wrote %d shards, %s tokens, %d documents skipped, to %s", len(shards), f"{written:,}", skipped, out)
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Training loader: memory-mapped shards -> (B, T) batches


class TokenShardLoader:
    """(x, y) int64 batches of shape (B, T) from token shards, y = x shifted by one; each rank its own windows.

    A window is T + 1 consecutive tokens of one shard, windows start every T tokens (consecutive windows share one
    token, as in nanoGPT). An epoch is every window of every shard once: shard order and the windows within each
    shard are permuted with a generator seeded by (seed, epoch, shard). Think of the epochs laid end to end as one
    stream of windows; global batch g takes windows [g*B*W, (g+1)*B*W) of it (W = world_size) and rank r the r-th
    slice of B. So ranks are disjoint, nothing is skipped, and an epoch's last windows are served in the next global
    batch together with the first windows of the following epoch (not dropped, not repeated). The only tokens not
    served as inputs are each shard's tail shorter than a window (< T tokens per shard, `dropped_tokens_per_epoch`);
    with shuffle the window grid starts at a random offset each epoch so that a different part is left out.

    The loader does its own sharding across ranks: do not pass it through `accelerator.prepare`.
    """

    def __init__(
        self,
        data_dir_or_glob: str | os.PathLike,
        split: str = "train",
        batch_size: int = 64,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        self.files = find_shards(data_dir_or_glob, split)
        self.shards = [read_shard(f) for f in self.files]
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.windows = np.maximum(lengths - 1, 0) // seq_len  # windows per shard
        self.windows_per_epoch = int(self.windows.sum())
        self.dropped_tokens_per_epoch = int((np.maximum(lengths - 1, 0) - self.windows * seq_len).sum())
        if self.windows_per_epoch < batch_size * world_size:
            raise DataError(
                f"{data_dir_or_glob}: {split} has {self.windows_per_epoch} windows of {seq_len}+1 tokens, fewer than "
                f"one global batch ({batch_size} x {world_size} ranks). Prepare more data or use smaller batches."
            )
        fingerprint = "".join(f"{f.name}:{n};" for f, n in zip(self.files, lengths, strict=True))
        self._fingerprint = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self._consumed = 0  # windows of the endless stream taken by all ranks before this step
        self._plans: dict = {}  # small caches: epoch -> (shard order, cumulative windows), (epoch, shard) -> windows
        self._perms: dict = {}
        logger.info(
            "%s: %d %s shards, %d windows of %d+1 tokens per epoch; %d tokens (shard tails < T) unused per epoch",
            data_dir_or_glob, len(self.files), split, self.windows_per_epoch, seq_len, self.dropped_tokens_per_epoch,
        )  # fmt: skip

    @property
    def epoch(self) -> int:
        """The epoch of this rank's next window."""
        return (self._consumed + self.rank * self.batch_size) // self.windows_per_epoch

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._plans:
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            cum = np.concatenate([[0], np.cumsum(self.windows[order])])
            self._plans = {epoch: (order, cum), **{e: p for e, p in self._plans.items() if e == epoch - 1}}
        return self._plans[epoch]

    def _shard_windows(self, epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(the shard's windows as a (n, T+1) view, their order this epoch)."""
        key = (epoch, shard)
        if key not in self._perms:
            tokens, n, T = self.shards[shard], int(self.windows[shard]), self.seq_len
            order, offset = np.arange(n), 0
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, shard])
                offset = int(rng.integers(0, len(tokens) - 1 - n * T + 1))
                order = rng.permutation(n)
            view = np.lib.stride_tricks.sliding_window_view(tokens[offset : offset + n * T + 1], T + 1)[::T]
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[key] = (view, order)
        return self._perms[key]

    def _gather(self, start: int, count: int) -> np.ndarray:
        """Windows [start, start + count) of the endless stream as a (count, T+1) uint16 array."""
        out = np.empty((count, self.seq_len + 1), dtype=np.uint16)
        done = 0
        while done < count:  # one pass per shard the range touches (usually one)
            epoch, pos = divmod(start + done, self.windows_per_epoch)
            order, cum = self._plan(epoch)
            j = int(np.searchsorted(cum, pos, side="right")) - 1
            local = pos - int(cum[j])
            view, perm = self._shard_windows(epoch, int(order[j]))
            take = min(count - done, len(perm) - local)
            out[done : done + take] = view[perm[local : local + take]]
            done += take
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank: int64 CPU tensors of shape (B, T)."""
        B = self.batch_size
        windows = self._gather(self._consumed + self.rank * B, B)  # (B, T+1) uint16
        self._consumed += B * self.world_size
        x = torch.from_numpy(windows[:, :-1].astype(np.int64))
        y = torch.from_numpy(windows[:, 1:].astype(np.int64))
        return x, y

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        """The position (windows consumed by all ranks) and what it refers to. Same on every rank."""
        return {
            "consumed_windows": self._consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "shards": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken: the next batch is the one an uninterrupted run would serve next.

        The position is global, so a resume may change world_size or batch_size (every rank loads the same state).
        """
        mine = self.state_dict()
        bad = [k for k in ("seed", "shuffle", "seq_len", "shards") if state.get(k) != mine[k]]
        if bad:
            diffs = ", ".join(f"{k}: {state.get(k)!r} saved, {mine[k]!r} now" for k in bad)
            raise ValueError(
                f"Loader state does not match this loader ({diffs}); 'shards' differs when the shard files changed "
                "since the checkpoint. Resume with the same data, seed, shuffle and seq_len."
            )
        self._consumed = int(state["consumed_windows"])


def iter_val_batches(
    data_dir_or_glob: str | os.PathLike,
    batch_size: int,
    seq_len: int,
    val_tokens: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation (x, y) int64 batches of shape (b <= B, T): the first val_tokens // T windows of the val split.

    The windows depend only on seq_len and val_tokens, never on batch_size or world_size; rank r takes windows
    r, r + W, r + 2W, ... so the ranks' union is every window once. Ranks may get one window (and batch) more than
    others: reduce summed losses and token counts once at the end, not per batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    n_windows = val_tokens // seq_len
    if n_windows < 1:
        raise ValueError(f"val_tokens ({val_tokens}) must be at least seq_len ({seq_len})")
    files = find_shards(data_dir_or_glob, "val")
    shards = [read_shard(f) for f in files]
    need, have = n_windows * seq_len + 1, sum(len(s) for s in shards)
    if have < need:
        raise DataError(
            f"The val split at {data_dir_or_glob} has {have:,} tokens, fewer than the {need:,} needed for "
            f"val_tokens={val_tokens:,} at seq_len={seq_len} (+1 for the last target). Ask for fewer val tokens or "
            "prepare a larger validation shard (data_prep.py --val_tokens)."
        )
    pieces, left = [], need  # the first `need` tokens of the val shards, copied only if they span shards
    for shard in shards:
        pieces.append(shard[:left])
        left -= len(pieces[-1])
        if not left:
            break
    tokens = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len]  # (n_windows, T+1)
    mine = np.arange(rank, n_windows, world_size)
    for i in range(0, len(mine), batch_size):
        w = windows[mine[i : i + batch_size]]
        yield torch.from_numpy(w[:, :-1].astype(np.int64)), torch.from_numpy(w[:, 1:].astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# Streaming loader: train straight from a `datasets` stream


class StreamingTokenLoader:
    """(x, y) int64 (B, T) batches tokenized on the fly from a stream; no preparation step.

    Each rank reads its part of the stream (`datasets.distributed.split_dataset_by_node`: whole files when their
    number divides world_size, else every world_size-th document), so do not pass it through `accelerator.prepare`.
    The token stream is packed without padding: a batch is the next B*T+1 tokens (windows overlap by one token, as
    in TokenShardLoader). After the stream ends the next epoch starts (`set_epoch`) and batches continue across it.
    `state_dict()` is the stream's own `state_dict()` before the document batch holding the next token, plus how far
    into it we are: exact resume. With `shuffle_buffer` > 0 the documents pass through `datasets`' shuffle buffer,
    whose contents a resume cannot restore (a datasets limitation), so resume is exact only with shuffle_buffer=0.
    Tokenizes in background threads (forking worker processes from a training process is unsafe).
    """

    def __init__(
        self,
        dataset: str = DEFAULT_DATASET,
        name: str | None = None,
        split: str = "train",
        text_column: str = "text",
        batch_size: int = 64,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        shuffle_buffer: int = 0,
        num_workers: int = 2,
        batch_docs: int = 64,
        vocab_file: str | None = None,
    ):
        self.encoding = get_gpt2_encoding(vocab_file)
        self._source = (dataset, name, split, text_column)
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.text_column, self.batch_size, self.seq_len = text_column, batch_size, seq_len
        self.num_workers, self.batch_docs = num_workers, batch_docs
        self._epoch, self._skip, self._start_state = 0, 0, None
        self._restart()

    def _open(self):
        from datasets.distributed import split_dataset_by_node

        ds = open_text_stream(*self._source).dataset
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        return split_dataset_by_node(ds, self.rank, self.world_size) if self.world_size > 1 else ds

    def _restart(self) -> None:
        """(Re)open the stream at epoch self._epoch, state self._start_state, skipping self._skip tokens."""
        self.dataset = self._open()  # a fresh object: no stale starting state from an earlier load
        self.dataset.set_epoch(self._epoch)
        if self._start_state is not None:
            self.dataset.load_state_dict(self._start_state)
        self._batches = encoded_batches(
            self.dataset,
            self.text_column,
            self.encoding,
            self.num_workers,
            self.batch_docs,
            self._start_state,
        )
        self._chunks: deque = deque()  # [epoch, stream state before the batch, tokens, tokens already served]
        self._pending_skip = self._skip

    def _fill(self, need: int) -> None:
        have = sum(len(c[2]) - c[3] for c in self._chunks)
        empty_epochs = 0
        while have < need:
            try:
                state, tokens, _ = next(self._batches)
            except StopIteration:
                empty_epochs = empty_epochs + 1 if have == 0 else 0
                if empty_epochs > 1:
                    raise DataError("The stream yields no tokens: every document is empty or not text") from None
                self._epoch += 1
                self.dataset.set_epoch(self._epoch)
                self._batches = encoded_batches(
                    self.dataset, self.text_column, self.encoding, self.num_workers, self.batch_docs, None
                )
                continue
            skip, self._pending_skip = self._pending_skip, 0
            self._chunks.append([self._epoch, state, tokens, skip])
            have += len(tokens) - skip

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        self._fill(B * T + 1)
        out, done = np.empty(B * T + 1, dtype=np.uint16), 0
        for chunk in self._chunks:
            take = min(len(out) - done, len(chunk[2]) - chunk[3])
            out[done : done + take] = chunk[2][chunk[3] : chunk[3] + take]
            done += take
            if done == len(out):
                break
        served = B * T  # the last token is also the first input of the next batch
        while served:
            chunk = self._chunks[0]
            take = min(served, len(chunk[2]) - chunk[3])
            chunk[3] += take
            served -= take
            if chunk[3] == len(chunk[2]):
                self._chunks.popleft()
        windows = out.astype(np.int64)
        return torch.from_numpy(windows[:-1].reshape(B, T)), torch.from_numpy(windows[1:].reshape(B, T))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    @property
    def epoch(self) -> int:
        return self._chunks[0][0] if self._chunks else self._epoch

    def state_dict(self) -> dict:
        if self._chunks:
            epoch, state, _, skip = self._chunks[0]
        else:  # nothing buffered: the next token is the first of the next document batch
            epoch, state, skip = self._epoch, self._start_state, self._pending_skip
        return {"epoch": epoch, "dataset_state": state, "skip_tokens": skip}

    def load_state_dict(self, state: dict) -> None:
        self._batches.close()
        self._epoch, self._start_state, self._skip = state["epoch"], state["dataset_state"], state["skip_tokens"]
        self._restart()


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(PrepConfig, description=__doc__.split("\n\n")[0]).parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = prepare(cfg)
    except (DataError, FileNotFoundError) as e:
        logger.error("error: %s", e)
        return 2
    print(json.dumps({k: manifest[k] for k in ("tokens", "documents", "skipped_documents")} | asdict(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
