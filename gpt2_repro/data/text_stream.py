"""Text datasets as streams of GPT-2 tokens: what data preparation and the streaming loader both read.

`open_text_stream` opens a Hub dataset (FineWeb-Edu by default) or local parquet / jsonl / txt files through the
same `datasets.load_dataset(..., streaming=True)`, keeping only the text column. `encoded_batches` tokenizes it in
background threads, one batch of documents at a time, with the stream state before each batch so a reader can
resume exactly. Every document is preceded by the end-of-text token 50256 (build-nanogpt's and llm.c's fineweb.py
convention: EOT *before* each document).
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..base.config import READ_RETRIES
from ..base.errors import DataError, NotFound, StreamReadError
from ..base.published import DEFAULT_DATASET_CONFIGS
from .tokenizer import EOT_ID

logger = logging.getLogger("text_stream")

LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text"}
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
            raise NotFound(f"--dataset {spec}: no file matches this glob")
    elif path.is_dir():
        files = [str(p) for p in path.rglob("*") if p.is_file() and _builder_of(p.name) and not p.name.startswith(".")]
        if not files:
            raise NotFound(f"--dataset {spec}: the folder holds no {sorted(LOCAL_BUILDERS)} files")
    elif path.is_file():
        files = [str(path)]
    elif spec.startswith(("/", ".", "~")) or _builder_of(spec) or spec.count("/") > 1:
        raise NotFound(f"--dataset {spec}: no such file or folder (and it is not a Hub dataset id)")
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
        rows = None
        try:
            if builder == "parquet":
                with pq.ParquetFile(f) as parquet:
                    rows = parquet.metadata.num_rows
            else:
                with open(f, "rb") as fh:
                    fh.read(1)
        except Exception as e:
            raise DataError(f"Cannot read {f}: {type(e).__name__}: {e}. Fix or remove the file.") from e
        if rows == 0:  # the stream would fail on it ("BatchSize must be greater than 0"), at whatever point it is
            raise DataError(f"{f} holds no rows: datasets cannot stream an empty parquet file. Remove it.")


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
            ds = datasets.load_dataset(dataset, name, split=split, streaming=True, revision=revision)
        except Exception as e:  # DatasetNotFoundError, ConnectionError (offline), ValueError (config/split)
            raise DataError(
                f"Could not open dataset {dataset!r} (config {name!r}, split {split!r}): {type(e).__name__}: {e}. "
                f"Check the id, --dataset_name and --dataset_split on https://huggingface.co/datasets/{dataset}; "
                "offline, pass local files instead (--dataset path/to/*.parquet, *.jsonl or *.txt, or a folder)."
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
# ~10 MB). A batch of documents is encoded in one call, joined by the end-of-text token that must precede each of
# them anyway: tiktoken encodes the text between special tokens piece by piece, so the result is exactly that of
# one call per document, without a Python call, a small array and a concatenation per document (BENCHMARKS.md).

_own_encoding = threading.local()


def _thread_copy(encoding):
    """This thread's own copy of `encoding` (see above)."""
    mine = getattr(_own_encoding, "pair", None)
    if mine is None or mine[0] is not encoding:
        import tiktoken

        copy = tiktoken.Encoding(
            name=encoding.name,
            pat_str=encoding._pat_str,
            mergeable_ranks=encoding._mergeable_ranks,
            special_tokens=encoding._special_tokens,
        )
        _own_encoding.pair = mine = (encoding, copy)
    return mine[1]


EOT_TEXT = "<|endoftext|>"
_EOT_ONLY = frozenset({EOT_TEXT})


def encode_documents(encoding, texts: list) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents into one uint16 array, EOT before each. Returns (tokens, tokens of each document).

    A document that is not a string or is empty/whitespace-only gets no tokens (its count is 0: "skipped"). Text
    such as "<|endoftext|>" inside a document is encoded as ordinary text, so 50256 only ever marks a document start.
    """
    encoding = _thread_copy(encoding)
    doc_tokens = np.zeros(len(texts), dtype=np.int64)
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t and not t.isspace()]
    docs = texts if len(keep) == len(texts) else [texts[i] for i in keep]
    joined = EOT_TEXT + EOT_TEXT.join(docs)
    # One call for the batch, unless a document holds the literal text (it has no border, so every occurrence is
    # either one of our separators or inside a document) or a lone surrogate (UnicodeEncodeError).
    if joined.count(EOT_TEXT) == len(docs):
        try:
            ids = encoding.encode_to_numpy(joined, allowed_special=_EOT_ONLY)
        except UnicodeEncodeError:
            ids = None
        if ids is not None:
            starts = np.flatnonzero(ids == EOT_ID)  # (len(docs),): where each document begins
            doc_tokens[keep] = np.diff(starts, append=len(ids))
            return ids.astype(np.uint16), doc_tokens
    parts = []
    for i, text in zip(keep, docs, strict=True):
        try:
            ids = encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: replace them, as tiktoken's encode_ordinary does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = encoding.encode_to_numpy(text, disallowed_special=())
        parts += (_EOT_ARRAY, ids)
        doc_tokens[i] = len(ids) + 1
    if not parts:
        return np.zeros(0, dtype=np.uint16), doc_tokens
    return np.concatenate(parts).astype(np.uint16), doc_tokens


_EOT_ARRAY = np.array([EOT_ID], dtype=np.uint32)


@dataclass
class EncodedBatch:
    """One batch of documents, tokenized, and where it is in the stream."""

    state: dict | None  # the stream's state_dict() before this batch (None: the stream's start)
    tokens: np.ndarray  # (n,) uint16: the documents' tokens, EOT before each
    doc_tokens: np.ndarray  # (documents,) int64: tokens of each document of the batch; 0 = skipped
    skipped_before: int = 0  # documents skipped before this batch, where a reader counts them (stream_loader)

    @property
    def skipped(self) -> int:
        return int(np.count_nonzero(self.doc_tokens == 0))


# ----------------------------------------------------------------------------------------------------------------
# Reading, with retries: a Hub stream reads files over HTTP for hours


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0-based): 1, 2, 4, ... up to 60."""
    return float(min(60, 2**attempt))


def is_transient(error: BaseException) -> bool:
    """A read error worth retrying: network and I/O errors, HTTP 429 and 5xx; not a missing file or a refusal."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status is not None:  # huggingface_hub's HfHubHTTPError (an OSError) and the like
        return status == 429 or status >= 500
    if isinstance(error, OSError):  # ConnectionError, TimeoutError, pyarrow I/O errors, datasets' retries spent
        return True
    # HTTP clients' own connection errors (huggingface_hub's httpx), which are not OSErrors
    return any(c.__name__ in ("RequestError", "TransportError") for c in type(error).__mro__)


def encoded_batches(
    ds,
    column: str,
    encoding,
    num_workers: int,
    batch_docs: int,
    start_state: dict | None = None,
    retries: int = READ_RETRIES,
) -> Iterator[EncodedBatch]:
    """Tokenized consecutive batches of `batch_docs` documents of the stream `ds`, from `start_state` (None: start).

    The calling thread reads the stream (so its `state_dict()` stays exact) while `num_workers` threads tokenize up
    to 2 * num_workers batches ahead. A read error is dealt with once the batches read before it are yielded: a
    transient one (`is_transient`) reopens the stream at the state after the last batch read and retries, waiting
    `retry_delay` between attempts; after `retries` failures in a row, or on any other read error, it raises
    StreamReadError (a DataError).
    """
    if start_state is not None:
        ds.load_state_dict(start_state)
    restart = start_state if start_state is not None else ds.state_dict()
    state, failures, exhausted, error = start_state, 0, False, None
    rows = ds.iter(batch_size=batch_docs)
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="tokenizer")
    pending: deque = deque()
    try:
        while True:
            while error is None and not exhausted and len(pending) < 2 * num_workers:
                try:
                    batch = next(rows)
                except StopIteration:
                    exhausted = True
                    break
                except Exception as e:  # handled once the batches read before it are yielded
                    error = e
                    break
                failures = 0
                pending.append((state, pool.submit(encode_documents, encoding, batch[column])))
                state = ds.state_dict()
            if pending:
                batch_state, future = pending.popleft()
                yield EncodedBatch(batch_state, *future.result())
                continue
            if error is None:
                return
            what = f"{type(error).__name__}: {error}"
            if not is_transient(error):
                raise StreamReadError(f"Reading the dataset failed: {what}", transient=False) from error
            if failures >= retries:
                raise StreamReadError(
                    f"Reading the dataset failed {failures + 1} times in a row, the last time with {what}"
                ) from error
            delay = retry_delay(failures)
            failures += 1
            logger.warning("Reading the dataset failed (%s); retry %d/%d in %.0f s", what, failures, retries, delay)
            time.sleep(delay)
            rows.close()
            ds.load_state_dict(state if state is not None else restart)
            rows, error = ds.iter(batch_size=batch_docs), None
    finally:
        rows.close()  # an unfinished datasets parquet iterator left to the garbage collector can hang at exit
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------------
# Cutting a stream into shards: what data_prep.py writes, and what the streaming loader cuts the same way


@dataclass
class Piece:
    """Consecutive tokens of one shard, all from one batch."""

    shard: int
    tokens: np.ndarray  # a view into batch.tokens
    batch: EncodedBatch
    offset: int  # tokens[0] is batch.tokens[offset]
    shard_end: bool  # the shard is complete with these tokens


def cut_shards(
    batches: Iterator[EncodedBatch], capacity, shard: int = 0, filled: int = 0, skip: int = 0
) -> Iterator[Piece]:
    """Cut the token stream of `batches` into consecutive shards of `capacity(index)` tokens; stop at capacity 0.

    To continue inside a stream: its first `skip` tokens are not part of it, and shard `shard` already holds
    `filled` tokens. The stream's last shard may end short (no piece has shard_end then).
    """
    for batch in batches:
        if skip >= len(batch.tokens):  # resuming past this batch
            skip -= len(batch.tokens)
            continue
        pos, skip = skip, 0
        while pos < len(batch.tokens):
            room = capacity(shard) - filled
            if room <= 0:
                return
            take = min(room, len(batch.tokens) - pos)
            filled += take
            yield Piece(shard, batch.tokens[pos : pos + take], batch, pos, take == room)
            pos += take
            if take == room:
                shard, filled = shard + 1, 0


class StreamHead(NamedTuple):
    """The first tokens of a stream (`read_stream_head`)."""

    tokens: np.ndarray  # (min(keep, n_tokens),) uint16
    end: tuple[int, int] | None  # where the stream goes on: (row, tokens of that row taken); None: it is shorter
    skipped: int  # documents before that row skipped (empty, whitespace-only or not text), as data_prep.py counts


def read_stream_head(
    ds,
    column: str,
    encoding,
    n_tokens: int,
    keep: int | None = None,
    num_workers: int = 2,
    batch_docs: int = 256,
    retries: int = READ_RETRIES,
) -> StreamHead:
    """The first n_tokens tokens of a stream: data_prep.py's validation shard when n_tokens is its --val_tokens.

    Returns the first min(keep, n_tokens) of them, where the stream goes on after them (row, tokens of that row
    already taken: None when the stream holds fewer than n_tokens tokens) and how many documents before that row
    were skipped.
    """
    keep = n_tokens if keep is None else min(keep, n_tokens)
    head, got, rows_before, skipped = np.empty(keep, dtype=np.uint16), 0, 0, 0

    def counted(batches):
        nonlocal rows_before, skipped
        for batch in batches:
            yield batch
            rows_before += len(batch.doc_tokens)
            skipped += batch.skipped

    stream = encoded_batches(ds, column, encoding, num_workers, batch_docs, retries=retries)
    try:
        for piece in cut_shards(counted(stream), lambda i: n_tokens if i == 0 else 0):
            take = min(keep - got, len(piece.tokens))
            head[got : got + take] = piece.tokens[:take]
            got += take
            if piece.shard_end:
                end = piece.offset + len(piece.tokens)  # in the batch
                doc_tokens = piece.batch.doc_tokens
                cum = np.cumsum(doc_tokens)
                row = int(np.searchsorted(cum, end, side="right"))  # the row holding token `end`
                skipped += int(np.count_nonzero(doc_tokens[:row] == 0))
                return StreamHead(head, (rows_before + row, end - (int(cum[row - 1]) if row else 0)), skipped)
    finally:
        stream.close()
    return StreamHead(head[:got], None, skipped)
