"""Train straight from a `datasets` text stream, cut the way data_prep.py cuts shards: no preparation step.

`StreamingTokenLoader` is a data source (`source.py`), as TokenShardLoader is: it serves (B, T) batches; one
reader thread reads and cuts the stream, tokenizer threads tokenize it (`text_stream.py`), and a resume continues
exactly at the next window. `StreamSpec` says which stream and how it is cut and read.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..base.atomic_io import json_fields_problem
from ..base.config import READ_RETRIES, SHARD_TOKENS, VAL_TOKENS
from ..base.errors import DataError, StreamReadError
from ..base.published import FINEWEB_EDU
from . import text_stream as ts
from .shards import val_shard_tokens
from .tokenizer import get_gpt2_encoding
from .windows import as_xy

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from ..base.config import DataConfig, TrainConfig

# What a streamed run's checkpoint is bound to besides the generic settings: the stream, and how it is cut into
# validation tokens, shards and shuffled blocks (the read settings, workers, documents per task and retries, may
# change).
RESUME_MUST_MATCH = (
    "dataset",
    "dataset_name",
    "dataset_split",
    "text_column",
    "stream_val_tokens",
    "stream_shard_tokens",
    "stream_shuffle_windows",
)


@dataclass(frozen=True)
class StreamSpec:
    """Which text stream, and how it is cut (as data_prep.py cuts it) and read."""

    dataset: str = FINEWEB_EDU  # a Hub dataset id, or local parquet/jsonl/txt files (a file, folder or glob)
    name: str | None = None  # the dataset's config (sample-10BT for FineWeb-Edu when None)
    split: str = "train"
    text_column: str = "text"
    val_tokens: int = VAL_TOKENS  # the first N + 1 tokens are the validation set, never trained on
    shard_tokens: int = SHARD_TOKENS  # training windows never span a multiple of N tokens after them
    shuffle_windows: int = 8192  # with shuffle: windows are permuted in seeded blocks of this many
    num_workers: int = 2  # tokenizer threads
    batch_docs: int = 256  # documents per tokenizer task
    retries: int = READ_RETRIES  # after a transient read error

    @classmethod
    def of(cls, data: DataConfig) -> StreamSpec:
        """The stream a training config's data section names."""
        return cls(
            data.dataset,
            data.dataset_name,
            data.dataset_split,
            data.text_column,
            data.stream_val_tokens,
            data.stream_shard_tokens,
            data.stream_shuffle_windows,
            data.stream_workers,
            data.stream_batch_docs,
            data.stream_retries,
        )

    @property
    def text_source(self) -> tuple[str, str | None, str, str]:
        """(dataset, name, split, text column): what `text_stream.open_text_stream` takes."""
        return (self.dataset, self.name, self.split, self.text_column)


@dataclass
class _Block:
    """Windows ready to serve, and where each one starts in the stream (for state_dict)."""

    windows: np.ndarray  # (n, T+1) uint16, in serving order
    starts: list[dict]  # shuffle off: where each window starts; on: where the block's first window starts
    epoch: int
    index: int  # the block's number in its epoch (shuffle on)
    served_before: int  # windows of this (shuffled) block served before a resume; 0 otherwise
    shuffled: bool

    def resume_point(self, j: int) -> dict:
        """Where to restart so that window j of this block is served next."""
        if self.shuffled:
            at = {"block": self.index, "block_served": self.served_before + j}
            return {**self.starts[0], "epoch": self.epoch, **at}
        if j < len(self.starts):
            start = self.starts[j]
        else:  # all served: T tokens after the last window's start, where the next one would start
            T, last = self.windows.shape[1] - 1, self.starts[-1]
            start = {**last, "skip_tokens": last["skip_tokens"] + T, "shard_filled": last["shard_filled"] + T}
        return {**start, "epoch": self.epoch, "block": 0, "block_served": 0}


@dataclass
class _Failure:
    error: BaseException


def _resumable(error: BaseException) -> BaseException:
    """A read error, with what to do next: resume once a network failure that outlasted the retries has passed; fix
    the data when retrying cannot help. Other errors as they are."""
    if not isinstance(error, StreamReadError):
        return error
    if not error.transient:
        return DataError(
            f"{error}. Retrying cannot mend this: the data itself cannot be read. Fix or replace what it names, then "
            "train again (a resume onto other files is refused: the stream would not be the checkpoint's)."
        )
    return DataError(
        f"{error}. Once it can be read again, continue with --resume latest: training goes on from the "
        "last checkpoint, exactly where it was."
    )


_LIVE_LOADERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    """Stop the reader threads before the interpreter tears down: a `datasets` parquet iterator left unfinished
    to the garbage collector can hang the exit (datasets 5.2, pyarrow 26)."""
    for loader in list(_LIVE_LOADERS):
        loader.close()


def _cut_windows(pieces, seq_len: int, filled: int = 0) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """(windows (n, T+1) uint16, where each starts) from pieces of shards: T+1 tokens of one shard, every T tokens.

    A window never spans two shards; a shard's tail too short for one more window is unused (TokenShardLoader's
    layout). `filled`: the shard position of the first piece's first token. Where a window starts is the stream
    state before the batch holding its first token, that token's index in the batch, the shard position, and the
    documents skipped before that batch.
    """
    T = seq_len
    pend, anchors, at = (None, [], filled)  # the shard from the next window on; its pieces; pend[0]'s position
    for piece in pieces:
        anchors.append((0 if pend is None else len(pend), piece.batch, piece.offset))
        pend = piece.tokens if pend is None else np.concatenate([pend, piece.tokens])
        n = (len(pend) - 1) // T
        if n > 0:
            windows = np.lib.stride_tricks.sliding_window_view(pend[: n * T + 1], T + 1)[::T].copy()
            starts, a = [], 0
            for s in range(0, n * T, T):
                while a + 1 < len(anchors) and anchors[a + 1][0] <= s:
                    a += 1
                index, batch, offset = anchors[a]
                starts.append(
                    {
                        "dataset_state": batch.state,
                        "skip_tokens": offset + s - index,
                        "shard_filled": at + s,
                        "skipped_documents": batch.skipped_before,
                    }
                )
            yield windows, starts
            rest = n * T
            while len(anchors) > 1 and anchors[1][0] <= rest:
                anchors.pop(0)
            index, batch, offset = anchors[0]
            anchors = [(0, batch, offset + rest - index)] + [(i - rest, b, o) for i, b, o in anchors[1:]]
            pend, at = pend[rest:], at + rest
        if piece.shard_end:
            pend, anchors, at = None, [], 0


class StreamingTokenLoader:
    """(x, y) int64 (B, T) training batches cut from a text stream tokenized on the fly: no preparation step.

    The stream is cut as data_prep.py cuts it into shards, so that with shuffle off and one process, a streamed run
    is served exactly the batches TokenShardLoader serves from shards data_prep.py made of the same source with the
    same val_tokens and shard_tokens (bench/ and tests/ check it):
    - the stream's first `val_tokens` tokens are the validation set (`validation_tokens`: data_prep's val shard),
      never trained on;
    - the rest is cut into consecutive shards of `shard_tokens`; a window is T+1 tokens of one shard, windows start
      every T tokens, a shard's tail too short for a window is unused; windows are served in stream order, B per
      batch, and when the stream ends it starts again (the next epoch; a batch may hold both).
    With world_size W > 1 each process takes every W-th document after the validation tokens
    (`datasets.distributed.split_dataset_by_node`, "examples" strategy: every process reads the rows and keeps
    its own; a split by files could not start after the validation rows) and cuts its own documents as above. So
    no document is read by two processes and none is skipped, but a global batch holds other windows than a
    sharded run's, whose processes share one window order: per-step losses differ, the data of an epoch does not.
    The loader shards by process itself: never pass it through `accelerator.prepare`.

    shuffle: windows are served in a seeded permutation of consecutive blocks of `shuffle_windows` windows, a
    function of (seed, rank, epoch, block): local shuffling that keeps resume exact.

    `state_dict()` is where the next window starts: the stream's own `state_dict()` before the batch of documents
    holding it, the tokens of that batch before it, how full its shard is, the epoch and (shuffle) its block. A
    resume reads again from there (at most one block) and serves exactly the next window. Transient read errors
    are retried (`text_stream.encoded_batches`); a persistent one raises StreamReadError from next_batch.

    One reader thread reads the stream and cuts windows, `num_workers` threads tokenize, and ready windows wait in
    a queue, so next_batch only copies. Call close() when done (done at exit otherwise).
    """

    # ---- before a run: the data source's checks (source.py)

    @classmethod
    def preflight(cls, cfg: TrainConfig) -> None:
        """The stream is opened: its id, files and text column are checked; its length is known only once read."""
        ts.open_text_stream(*StreamSpec.of(cfg.data).text_source)

    @classmethod
    def verify(cls, cfg: TrainConfig, log) -> None:
        """Nothing to check against: a stream has no recorded checksums."""

    @classmethod
    def resume_facts(cls, cfg: TrainConfig) -> None:
        return None

    @classmethod
    def resume_problems(cls, saved: dict, now: dict, saved_data: dict | None, now_data: dict | None) -> list[str]:
        """A checkpoint of a run on shards, or of another stream or one cut another way (RESUME_MUST_MATCH)."""
        keys = RESUME_MUST_MATCH if saved.get("dataset") else ("dataset",)
        return [
            f"{key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now"
            for key in keys
            if saved.get(key) != now.get(key)
        ]

    @classmethod
    def elastic_problem(cls, checkpoint: Path, saved_processes: int, num_processes: int) -> str | None:
        """Each process reads its own documents from its own position: the process count cannot change."""
        if saved_processes == num_processes:
            return None
        return (
            f"{checkpoint} was saved by {saved_processes} processes reading the stream --dataset, each at its own "
            f"position in it, so it resumes with {saved_processes} processes, not {num_processes} "
            f"(`accelerate launch --num_processes {saved_processes} ...`). Runs on prepared shards (--data_dir) can "
            "change the process count."
        )

    @classmethod
    def position_problem(cls, state) -> str | None:
        """A position is state_dict's fields: where the next window starts, the validation set's end, the
        settings it was taken with."""
        count = (int,)
        fields = {"epoch": count, "skip_tokens": count, "shard_filled": count, "block": count, "block_served": count}
        fields |= {"dataset_state": (dict, type(None)), "validation_end": (list,), "settings": (dict,)}
        problem = json_fields_problem(state, fields)
        if problem is None and not (
            len(state["validation_end"]) == 2 and all(type(v) is int for v in state["validation_end"])
        ):
            problem = f"the data position's 'validation_end' is {state['validation_end']!r}, not [rows, tokens]"
        return problem

    @classmethod
    def from_config(cls, cfg: TrainConfig, rank: int, world_size: int) -> StreamingTokenLoader:
        data = cfg.data
        return cls(
            StreamSpec.of(data),
            data.micro_batch_size,
            data.seq_len,
            rank,
            world_size,
            cfg.run.seed,
            data.shuffle,
            keep_val_tokens=cfg.eval.val_tokens // data.seq_len * data.seq_len + 1,  # iter_val_batches' windows
        )

    def __init__(
        self,
        stream: StreamSpec,
        batch_size: int = 64,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        shuffle: bool = False,
        keep_val_tokens: int = 0,
        vocab_file: str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if min(batch_size, seq_len, stream.val_tokens, stream.shuffle_windows, stream.num_workers) < 1:
            raise ValueError("batch_size, seq_len, val_tokens, shuffle_windows and num_workers must be >= 1")
        if stream.shard_tokens <= seq_len:
            raise ValueError(f"shard_tokens ({stream.shard_tokens}) must exceed seq_len ({seq_len})")
        if keep_val_tokens > val_shard_tokens(stream.val_tokens):
            raise ValueError(
                f"keep_val_tokens ({keep_val_tokens}) exceeds the validation set ({stream.val_tokens} + 1)"
            )
        self.stream, self.encoding = stream, get_gpt2_encoding(vocab_file)
        self._source = stream.text_source
        self.source = ts.open_text_stream(*self._source)  # checks the id, files and column now
        self.text_column, self.batch_size, self.seq_len = stream.text_column, batch_size, seq_len
        self.val_tokens, self.shard_tokens = stream.val_tokens, stream.shard_tokens
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.shuffle_windows, self.keep_val_tokens = stream.shuffle_windows, keep_val_tokens
        self.num_workers, self.batch_docs, self.retries = stream.num_workers, stream.batch_docs, stream.retries
        self._boundary: tuple[int, int] | None = None  # (rows, tokens of the next row) of the validation set
        self._head_skipped = 0  # documents of the validation set skipped (not text): process 0 counts them
        self._reported = 0  # skipped documents `report` has told of
        self._validation: np.ndarray | None = None
        self._start: dict | None = None  # the resume point to start from; None: the training stream's start
        self._block: _Block | None = None
        self._served = 0  # windows of self._block already served
        self._reader: tuple | None = None  # (thread, queue, stop event) while reading
        self._failure: BaseException | None = None

    # ---- the stream: validation part, then this process's training documents

    def _scan(self, find_boundary: bool) -> None:
        """Read the stream's validation tokens: keep the first keep_val_tokens; find where training starts."""
        n = val_shard_tokens(self.val_tokens) if find_boundary else self.keep_val_tokens
        ds = ts.open_text_stream(*self._source).dataset
        args = (self.keep_val_tokens, self.num_workers, self.batch_docs, self.retries)
        try:
            head, boundary, skipped = ts.read_stream_head(ds, self.text_column, self.encoding, n, *args)
        except StreamReadError as e:
            raise _resumable(e) from e
        if len(head) < self.keep_val_tokens or (find_boundary and boundary is None):
            raise DataError(
                f"{self._source[0]}: the stream holds fewer than {n:,} tokens, so nothing would be left to train "
                f"on after the validation set (--stream_val_tokens {self.val_tokens:,}) or it cannot hold the "
                f"validation budget ({self.keep_val_tokens:,} tokens). Lower --stream_val_tokens or --val_tokens."
            )
        self._validation = head
        if find_boundary:
            self._boundary, self._head_skipped = boundary, skipped

    @property
    def validation_data(self) -> np.ndarray:
        """What `iter_val_batches` reads: the validation tokens themselves."""
        return self.validation_tokens

    @property
    def identity(self) -> dict:
        """The stream's identity (dataset, config, split, files or revision): recorded and named on the card."""
        return self.source.identity

    def checkpoint_facts(self) -> dict:
        return {"skipped_documents": self.skipped_documents}

    @property
    def skipped_documents(self) -> int:
        """Documents of the stream this process skipped before its next window (empty, whitespace-only or not a
        string: no tokens), as data_prep.py counts its skipped_documents: the validation set's (process 0) and the
        first epoch's, so that once an epoch is read it is data_prep.py's count of the same source (summed over
        the processes). Part of the position: a resume goes on counting."""
        return self._current().resume_point(self._served).get("skipped_documents", 0)

    def restore_hint(self) -> None:
        """Nothing to add: a stream that cannot be read says why itself (`_resumable`)."""
        return None

    def report(self) -> str | None:
        """A line when more documents were skipped since the last report (None otherwise)."""
        skipped = self.skipped_documents
        if skipped == self._reported:
            return None
        self._reported = skipped
        return (
            f"--dataset {self._source[0]}: {skipped:,} documents skipped so far (empty, whitespace-only or not "
            f"text, as data_prep.py skips them{'' if self.world_size == 1 else ', by this process'}; "
            "skipped_documents in each checkpoint's run_state.json)"
        )

    @property
    def validation_tokens(self) -> np.ndarray:
        """The stream's first keep_val_tokens tokens: the start of data_prep.py's val shard (iter_val_batches)."""
        if self._validation is None:
            self._scan(find_boundary=self._boundary is None)
        return self._validation

    def _training_stream(self):
        """This process's documents after the validation set, as a fresh `datasets` stream."""
        from datasets.distributed import split_dataset_by_node

        ds = ts.open_text_stream(*self._source).dataset.skip(self._boundary[0])
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, self.rank, self.world_size, strategy="examples")
        return ds

    def _epoch_blocks(self, epoch: int, at: dict | None, skipped: list[int]) -> Iterator[_Block]:
        """The blocks of one epoch, from `at` (a resume point of this epoch) or from its start. `skipped`: [the
        documents skipped before], counted on as the first epoch is read (later epochs read the same documents)."""
        lead = self._boundary[1] if self.rank == 0 else 0  # the validation part of the first document
        at = at or {"dataset_state": None, "skip_tokens": lead, "shard_filled": 0}
        skipped[0] = at.get("skipped_documents", skipped[0])

        def counted(batches):
            for batch in batches:
                batch.skipped_before = skipped[0]
                yield batch
                skipped[0] += batch.skipped if epoch == 0 else 0

        batches = ts.encoded_batches(
            self._training_stream(),
            self.text_column,
            self.encoding,
            self.num_workers,
            self.batch_docs,
            at["dataset_state"],
            self.retries,
        )
        try:
            size = self.shard_tokens
            pieces = ts.cut_shards(counted(batches), lambda _: size, filled=at["shard_filled"], skip=at["skip_tokens"])
            windows = _cut_windows(pieces, self.seq_len, at["shard_filled"])
            if not self.shuffle:
                for w, starts in windows:
                    yield _Block(w, starts, epoch, 0, 0, False)
                return
            index, served, parts, have, first = at.get("block", 0), at.get("block_served", 0), [], 0, None
            for w, starts in windows:
                i = 0
                while i < len(w):
                    if not have:
                        first = starts[i]
                    take = min(self.shuffle_windows - have, len(w) - i)
                    parts.append(w[i : i + take])
                    have, i = have + take, i + take
                    if have == self.shuffle_windows:
                        yield self._shuffled(parts, first, epoch, index, served)
                        index, served, parts, have, first = index + 1, 0, [], 0, None
            if have:
                yield self._shuffled(parts, first, epoch, index, served)
        finally:
            batches.close()

    def _shuffled(self, parts, first: dict, epoch: int, index: int, served: int) -> _Block:
        windows = np.concatenate(parts)
        order = np.random.default_rng([self.seed, self.rank, epoch, index]).permutation(len(windows))
        return _Block(windows[order[served:]], [first], epoch, index, served, True)

    def _blocks(self, start: dict | None) -> Iterator[_Block]:
        """Blocks of windows from `start` on, epoch after epoch."""
        epoch = start["epoch"] if start else 0
        skipped = [self._head_skipped if self.rank == 0 else 0]  # a resume point says its own
        while True:
            served = 0
            for block in self._epoch_blocks(epoch, start, skipped):
                served += len(block.windows)
                yield block
            if not served and start is None:
                raise DataError(
                    f"{self._source[0]}: after its validation tokens, this process's part of the stream holds no "
                    f"window of {self.seq_len + 1} tokens. Use more data, fewer processes or a shorter --seq_len."
                )
            epoch, start = epoch + 1, None

    # ---- the reader thread

    def _read(self, start: dict | None, ready: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        blocks = self._blocks(start)
        try:
            for block in blocks:
                if not put(block):
                    return
        except BaseException as e:  # handed to the training thread, which raises it
            put(_Failure(e))
        finally:
            blocks.close()

    def _next_block(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._reader is None:
            if self._boundary is None:
                self._scan(find_boundary=True)
            ready, stop = queue.Queue(maxsize=1 if self.shuffle else 4), threading.Event()
            thread = threading.Thread(
                target=self._read, args=(self._start, ready, stop), name="stream-reader", daemon=True
            )
            self._reader = (thread, ready, stop)
            _LIVE_LOADERS.add(self)
            thread.start()
        thread, ready, _ = self._reader
        while True:
            try:
                item = ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not thread.is_alive() and ready.empty():
                    raise RuntimeError("the stream reader thread ended without a word") from None
        if isinstance(item, _Failure):
            self._failure = _resumable(item.error)
            self.close()
            raise self._failure
        self._block, self._served = item, 0

    def _current(self) -> _Block:
        """The block holding the next window to serve."""
        while self._block is None or self._served == len(self._block.windows):
            self._next_block()
        return self._block

    def close(self) -> None:
        """Stop the reader thread. Prefetched windows are dropped: a later next_batch reads them again."""
        if self._reader is None:
            return
        thread, ready, stop = self._reader
        self._reader = None
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)
        _LIVE_LOADERS.discard(self)
        if self._block is not None and self._failure is None:
            self._start = self._block.resume_point(self._served)
            self._block, self._served = None, 0

    # ---- the data source interface (source.py)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this process: int64 CPU tensors of shape (B, T)."""
        parts, need = [], self.batch_size
        while need:
            block = self._current()
            take = min(need, len(block.windows) - self._served)
            parts.append(block.windows[self._served : self._served + take])
            self._served += take
            need -= take
        return as_xy(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    @property
    def epoch(self) -> int:
        """The epoch of this process's next window."""
        return self._current().epoch

    def _settings(self) -> dict:
        source = json.dumps(self.source.identity, sort_keys=True)
        return {
            "source": hashlib.sha256(source.encode()).hexdigest()[:16],
            "seq_len": self.seq_len,
            "val_tokens": self.val_tokens,
            "shard_tokens": self.shard_tokens,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_windows": self.shuffle_windows if self.shuffle else None,
        }

    def state_dict(self) -> dict:
        """Where this process's next window starts (JSON-serializable; each process has its own)."""
        block = self._current()
        return {**block.resume_point(self._served), "validation_end": list(self._boundary)} | {
            "settings": self._settings()
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken: the next batch is the one an uninterrupted run would serve next."""
        mine, saved = self._settings(), state.get("settings", {})
        bad = [k for k in mine if saved.get(k) != mine[k]]
        if bad:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} saved, {mine[k]!r} now" for k in bad)
            raise DataError(
                f"Stream loader state does not match this loader ({diffs}). Resume with the same dataset, "
                "process count, seed, shuffle, seq_len and stream settings."
            )
        self.close()
        keys = ("epoch", "dataset_state", "skip_tokens", "shard_filled", "block", "block_served")
        self._start = {k: state[k] for k in keys} | {"skipped_documents": state.get("skipped_documents", 0)}
        self._boundary = tuple(state["validation_end"])
        self._block, self._served, self._failure = None, 0, None
