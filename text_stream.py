"""Text datasets as streams of GPT-2 tokens: what data preparation and the streaming loader both read.

`open_text_stream` opens a Hub dataset (FineWeb-Edu by default) or local parquet / jsonl / txt files through the
same `datasets.load_dataset(..., streaming=True)`, keeping only the text column. `encoded_batches` tokenizes it in
background threads, one batch of documents at a time, with the stream state before each batch so a reader can
resume exactly. Every document is preceded by the end-of-text token 50256 (build-nanogpt's and llm.c's fineweb.py
convention: EOT *before* each document).
"""

from __future__ import annotations

import glob as globlib
import os
import re
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken

from gpt2_tokenizer import EOT_ID
from hub import DEFAULT_DATASET_CONFIGS
from token_data import DataError

LOCAL_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".txt": "text",
    ".text": "text",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")


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
        files = [
            str(p)
            for p in path.rglob("*")
            if p.is_file() and _builder_of(p.name) and not p.name.startswith(".")
        ]
        if not files:
            raise FileNotFoundError(
                f"--dataset {spec}: the folder holds no {sorted(LOCAL_BUILDERS)} files"
            )
    elif path.is_file():
        files = [str(path)]
    elif spec.startswith(("/", ".", "~")) or _builder_of(spec) or spec.count("/") > 1:
        raise FileNotFoundError(
            f"--dataset {spec}: no such file or folder (and it is not a Hub dataset id)"
        )
    else:
        return None
    return sorted(str(Path(f).resolve()) for f in files)


def is_local_source(spec: str) -> bool:
    """Whether --dataset names local files (a path, folder or glob) rather than a Hub dataset id."""
    return _local_files(spec) is not None


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
            raise DataError(
                f"Cannot read {f}: {type(e).__name__}: {e}. Fix or remove the file."
            ) from e


def open_text_stream(
    dataset: str,
    name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    text_sample_by: str = "document",
    revision: str | None = None,
) -> TextSource:
    """Open a Hub dataset or local files as a streaming `datasets.IterableDataset` of the text column.

    `revision` pins a Hub dataset to one commit (None: the newest); local files ignore it.
    """
    import datasets

    files = _local_files(dataset)
    if files is None:
        name = name or DEFAULT_DATASET_CONFIGS.get(dataset)
        ident = {"dataset": dataset, "name": name, "split": split, "text_column": text_column}
        prefix = dataset.rsplit("/", 1)[-1]
        try:
            ds = datasets.load_dataset(
                dataset, name, split=split, streaming=True, revision=revision
            )
        except (
            Exception
        ) as e:  # DatasetNotFoundError, ConnectionError (offline), ValueError (config/split)
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
            raise DataError(
                f"--dataset {dataset}: local files form the single split 'train', not {split!r}"
            )
        kwargs = {"sample_by": text_sample_by} if builder == "text" else {}
        ident = {"dataset": dataset, "builder": builder, "data_files": files, "split": "train"}
        ident.update(text_column=text_column, **kwargs)
        prefix = (
            Path(files[0]).stem.split(".")[0]
            if len(files) == 1
            else Path(os.path.commonpath(files)).name
        )
        try:
            ds = datasets.load_dataset(
                builder, data_files=files, split="train", streaming=True, **kwargs
            )
        except Exception as e:
            raise DataError(
                f"Could not open {dataset} as {builder}: {type(e).__name__}: {e}"
            ) from e
    columns = ds.column_names or _peek_columns(ds, dataset)
    if text_column not in columns:
        raise DataError(
            f"{dataset}: no column {text_column!r}; the columns are {columns}. Pass --text_column with one of them."
        )
    feature = (ds.features or {}).get(text_column)
    if feature is not None and getattr(feature, "dtype", "string") not in (
        "string",
        "large_string",
    ):
        raise DataError(
            f"{dataset}: column {text_column!r} holds {feature}, not text. Pass --text_column."
        )
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
        except (
            UnicodeEncodeError
        ):  # lone surrogates: replace them, as tiktoken's encode_ordinary does
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
