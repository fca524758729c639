"""GPT-2 token shards: the file format, and the readers that feed training and evaluation.

Shards use the llm.c / modded-nanogpt layout: a header of 256 little-endian int32 (magic 20240520, version 1,
token count, zeros) followed by the tokens as little-endian uint16. `*_val_000000.bin` is validation, the rest
(`*_train_000001.bin`, ...) training; build-nanogpt's `.npy` shards are read too. `data_prep.py` writes them.

Readers:
- `TokenShardLoader`: (B, T) training batches by memory map, each rank its own windows, exact resume;
- `iter_val_batches`: a fixed validation budget, the same windows whatever the batch size or process count;
- `StreamingTokenLoader`: (B, T) batches tokenized on the fly from a `datasets` stream, no preparation step.
"""

from __future__ import annotations

import atexit
import contextlib
import glob as globlib
import hashlib
import json
import logging
import os
import queue
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atomic_io import atomic_write
from gpt2_tokenizer import get_gpt2_encoding
from hub import FINEWEB_EDU

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("token_data")

SHARD_MAGIC = 20240520  # llm.c's magic for token shards
SHARD_VERSION = 1  # version 1 = GPT-2 uint16 tokens (llm.c's version 2 holds uint32 LLaMA-3 tokens)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


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
    with atomic_write(
        path, fsync=True
    ) as f:  # training trusts a shard that exists: make it durable
        for part in (header.data, tokens.data):
            f.write(part)
            digest.update(part)
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
            raise DataError(
                f"{path}: unreadable .npy shard ({type(e).__name__}: {e}); re-create it"
            ) from e
        if arr.dtype != np.uint16 or arr.ndim != 1:
            raise DataError(
                f"{path}: expected a 1-D uint16 token array, found {arr.dtype} of shape {arr.shape}"
            )
        return arr
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(
            f"{path}: truncated or not a token shard: {size} bytes, less than the {HEADER_BYTES}-byte header"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(
            f"{path}: not an llm.c token shard (magic {header[0]}, expected {SHARD_MAGIC})"
        )
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
        files = [
            Path(p) for p in globlib.glob(os.path.expanduser(spec)) if f"_{split}_" in Path(p).name
        ]
        files = [p for p in files if p.suffix in (".bin", ".npy")]
    if not files:
        raise FileNotFoundError(
            f"No {split} shards (*_{split}_*.bin or *_{split}_*.npy) found at {spec}. "
            f"Prepare them with: python data_prep.py --output_dir {spec}"
        )
    return sorted(files)


def shards_fingerprint(files: list[Path], lengths) -> str:
    """16 hex digits naming a list of shards by file name and token count (what a loader position refers to)."""
    text = "".join(f"{Path(f).name}:{n};" for f, n in zip(files, lengths, strict=True))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_fingerprint(data_dir_or_glob: str | os.PathLike, split: str = "train") -> str:
    """The fingerprint a TokenShardLoader of these shards saves in its state (headers only: no data is read)."""
    files = find_shards(data_dir_or_glob, split)
    return shards_fingerprint(files, [len(read_shard(f)) for f in files])


# ----------------------------------------------------------------------------------------------------------------
# Integrity: the SHA-256 of each shard, recorded in manifest.json by data_prep.py

MANIFEST = "manifest.json"


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)  # releases the GIL: threads hash several files at once
    return digest.hexdigest()


def verify_shards(folder: str | os.PathLike, threads: int | None = None) -> list[str] | None:
    """Check every shard manifest.json lists: present, of the recorded size, with the recorded SHA-256.

    Returns the problems found (empty: all intact), or None when the folder has no manifest.json to check against
    (shards from elsewhere, a glob). Files are hashed in `threads` threads (default: one per CPU core, up to 8):
    hashing is bound by the disk or by about 0.7-2 GB/s per core.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        shards = json.loads(path.read_text())["shards"]
        expected = [(Path(folder) / s["file"], int(s["tokens"]), s["sha256"]) for s in shards]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path}: unreadable ({type(e).__name__}: {e})"]

    def check(item: tuple[Path, int, str]) -> str | None:
        file, tokens, sha = item
        if not file.is_file():
            return f"{file}: missing"
        size, want = file.stat().st_size, HEADER_BYTES + 2 * tokens
        if size != want:
            return f"{file}: {size:,} bytes, manifest.json records {want:,} ({tokens:,} tokens)"
        if file_sha256(file) != sha:
            return f"{file}: its SHA-256 differs from manifest.json's (corrupted or changed since it was written)"
        return None

    workers = max(1, min(len(expected), threads or min(8, os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers, thread_name_prefix="sha256") as pool:
        return [problem for problem in pool.map(check, expected) if problem]


def check_shards(folder: str | os.PathLike, threads: int | None = None) -> bool:
    """Raise DataError naming every shard that does not match manifest.json; False when there is no manifest."""
    problems = verify_shards(folder, threads)
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise DataError(
            f"{folder}: {len(problems)} shard(s) do not match manifest.json: {shown}. Restore the files from where "
            "they came from, or prepare the data again into a new folder with data_prep.py."
        )
    return problems is not None


# ----------------------------------------------------------------------------------------------------------------
# Training loader: memory-mapped shards -> (B, T) batches


def as_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): int64 CPU tensors of shape (n, T) from (n, T+1) token windows, y = x shifted by one.

    torch is imported here rather than with the module: data_prep.py uses this module without torch (2 s less
    start-up).
    """
    import torch

    return (
        torch.from_numpy(windows[:, :-1].astype(np.int64)),
        torch.from_numpy(windows[:, 1:].astype(np.int64)),
    )


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
        self.batch_size, self.seq_len, self.rank, self.world_size = (
            batch_size,
            seq_len,
            rank,
            world_size,
        )
        self.seed, self.shuffle = seed, shuffle
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.windows = np.maximum(lengths - 1, 0) // seq_len  # windows per shard
        self.windows_per_epoch = int(self.windows.sum())
        self.dropped_tokens_per_epoch = int(
            (np.maximum(lengths - 1, 0) - self.windows * seq_len).sum()
        )
        if self.windows_per_epoch < batch_size * world_size:
            raise DataError(
                f"{data_dir_or_glob}: {split} has {self.windows_per_epoch} windows of {seq_len}+1 tokens, fewer than "
                f"one global batch ({batch_size} x {world_size} ranks). Prepare more data or use smaller batches."
            )
        self._fingerprint = shards_fingerprint(self.files, lengths)
        self._consumed = 0  # windows of the endless stream taken by all ranks before this step
        self._plans: dict = {}  # small caches: epoch -> (shard order, cumulative windows), (epoch, shard) -> windows
        self._perms: dict = {}
        logger.info(
            "%s: %d %s shards, %d windows of %d+1 tokens per epoch; %d tokens (shard tails < T) unused per epoch",
            data_dir_or_glob,
            len(self.files),
            split,
            self.windows_per_epoch,
            seq_len,
            self.dropped_tokens_per_epoch,
        )

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
            self._plans = {
                epoch: (order, cum),
                **{e: p for e, p in self._plans.items() if e == epoch - 1},
            }
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
            view = np.lib.stride_tricks.sliding_window_view(
                tokens[offset : offset + n * T + 1], T + 1
            )[::T]
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
        return as_xy(windows)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def close(self) -> None:
        """Nothing to release (memory maps close with the loader); StreamingTokenLoader's interface."""

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
    source: str | os.PathLike | np.ndarray,
    batch_size: int,
    seq_len: int,
    val_tokens: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation (x, y) int64 batches of shape (b <= B, T): the first val_tokens // T windows of the val split.

    `source`: a folder or glob of shards (their val split), or the val split's first tokens as an array (a
    stream's, `StreamingTokenLoader.validation_tokens`). The windows depend only on seq_len and val_tokens, never
    on batch_size or world_size; rank r takes windows r, r + W, r + 2W, ... so the ranks' union is every window
    once. Ranks may get one window (and batch) more than others: reduce summed losses and token counts once at the
    end, not per batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    n_windows = val_tokens // seq_len
    if n_windows < 1:
        raise ValueError(f"val_tokens ({val_tokens}) must be at least seq_len ({seq_len})")
    need = n_windows * seq_len + 1
    if isinstance(source, np.ndarray):
        shards, where, fix = [source], "The stream's validation set", "--stream_val_tokens"
    else:
        shards = [read_shard(f) for f in find_shards(source, "val")]
        where, fix = f"The val split at {source}", "data_prep.py --val_tokens"
    have = sum(len(s) for s in shards)
    if have < need:
        raise DataError(
            f"{where} has {have:,} tokens, fewer than the {need:,} needed for val_tokens={val_tokens:,} at "
            f"seq_len={seq_len} (+1 for the last target). Ask for fewer val tokens or a larger validation set "
            f"({fix})."
        )
    pieces, left = (
        [],
        need,
    )  # the first `need` tokens of the val shards, copied only if they span shards
    for shard in shards:
        pieces.append(shard[:left])
        left -= len(pieces[-1])
        if not left:
            break
    tokens = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len]  # (n, T+1)
    mine = np.arange(rank, n_windows, world_size)
    for i in range(0, len(mine), batch_size):
        w = windows[mine[i : i + batch_size]]
        yield as_xy(w)


# ----------------------------------------------------------------------------------------------------------------
# Streaming loader: train straight from a `datasets` stream, cut like data_prep.py's shards


def _text_stream():
    """text_stream.py, imported on first use: only streaming needs it, and it imports this module (DataError)."""
    import text_stream

    return text_stream


@dataclass
class _Block:
    """Windows ready to serve, and where each one starts in the stream (for state_dict)."""

    windows: np.ndarray  # (n, T+1) uint16, in serving order
    starts: list[
        dict
    ]  # shuffle off: where each window starts; on: where the block's first window starts
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
            start = {
                **last,
                "skip_tokens": last["skip_tokens"] + T,
                "shard_filled": last["shard_filled"] + T,
            }
        return {**start, "epoch": self.epoch, "block": 0, "block_served": 0}


@dataclass
class _Failure:
    error: BaseException


def _resumable(error: BaseException) -> BaseException:
    """A read error that outlasted the retries, with what to do next; other errors as they are."""
    if not isinstance(error, _text_stream().StreamReadError):
        return error
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
    state before the batch holding its first token, that token's index in the batch, and the shard position.
    """
    T = seq_len
    pend, anchors, at = (
        None,
        [],
        filled,
    )  # the shard from the next window on; its pieces; pend[0]'s position
    for piece in pieces:
        anchors.append((0 if pend is None else len(pend), piece.batch.state, piece.offset))
        pend = piece.tokens if pend is None else np.concatenate([pend, piece.tokens])
        n = (len(pend) - 1) // T
        if n > 0:
            windows = np.lib.stride_tricks.sliding_window_view(pend[: n * T + 1], T + 1)[::T].copy()
            starts, a = [], 0
            for s in range(0, n * T, T):
                while a + 1 < len(anchors) and anchors[a + 1][0] <= s:
                    a += 1
                index, state, offset = anchors[a]
                starts.append(
                    {
                        "dataset_state": state,
                        "skip_tokens": offset + s - index,
                        "shard_filled": at + s,
                    }
                )
            yield windows, starts
            rest = n * T
            while len(anchors) > 1 and anchors[1][0] <= rest:
                anchors.pop(0)
            index, state, offset = anchors[0]
            anchors = [(0, state, offset + rest - index)] + [
                (i - rest, s, o) for i, s, o in anchors[1:]
            ]
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

    def __init__(
        self,
        dataset: str = FINEWEB_EDU,
        name: str | None = None,
        split: str = "train",
        text_column: str = "text",
        batch_size: int = 64,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        shuffle: bool = False,
        val_tokens: int | None = None,
        shard_tokens: int | None = None,
        shuffle_windows: int = 8192,
        keep_val_tokens: int = 0,
        num_workers: int = 2,
        batch_docs: int = 256,
        retries: int | None = None,
        vocab_file: str | None = None,
    ):
        ts = _text_stream()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.val_tokens = ts.VAL_TOKENS if val_tokens is None else val_tokens
        self.shard_tokens = ts.SHARD_TOKENS if shard_tokens is None else shard_tokens
        if min(batch_size, seq_len, self.val_tokens, shuffle_windows, num_workers) < 1:
            raise ValueError(
                "batch_size, seq_len, val_tokens, shuffle_windows and num_workers must be >= 1"
            )
        if self.shard_tokens <= seq_len:
            raise ValueError(f"shard_tokens ({self.shard_tokens}) must exceed seq_len ({seq_len})")
        if keep_val_tokens > self.val_tokens:
            raise ValueError(
                f"keep_val_tokens ({keep_val_tokens}) exceeds val_tokens ({self.val_tokens})"
            )
        self.encoding = get_gpt2_encoding(vocab_file)
        self._source = (dataset, name, split, text_column)
        self.source = ts.open_text_stream(*self._source)  # checks the id, files and column now
        self.text_column, self.batch_size, self.seq_len = text_column, batch_size, seq_len
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.shuffle_windows, self.keep_val_tokens = shuffle_windows, keep_val_tokens
        self.num_workers, self.batch_docs = num_workers, batch_docs
        self.retries = ts.RETRIES if retries is None else retries
        self._boundary: tuple[int, int] | None = (
            None  # (rows, tokens of the next row) of the validation set
        )
        self._validation: np.ndarray | None = None
        self._start: dict | None = (
            None  # the resume point to start from; None: the training stream's start
        )
        self._block: _Block | None = None
        self._served = 0  # windows of self._block already served
        self._reader: tuple | None = None  # (thread, queue, stop event) while reading
        self._failure: BaseException | None = None

    # ---- the stream: validation part, then this process's training documents

    def _scan(self, find_boundary: bool) -> None:
        """Read the stream's validation tokens: keep the first keep_val_tokens; find where training starts."""
        ts = _text_stream()
        n = self.val_tokens if find_boundary else self.keep_val_tokens
        ds = ts.open_text_stream(*self._source).dataset
        args = (self.keep_val_tokens, self.num_workers, self.batch_docs, self.retries)
        try:
            head, boundary = ts.read_stream_head(ds, self.text_column, self.encoding, n, *args)
        except ts.StreamReadError as e:
            raise _resumable(e) from e
        if len(head) < self.keep_val_tokens or (find_boundary and boundary is None):
            raise DataError(
                f"{self._source[0]}: the stream holds fewer than {n:,} tokens, so nothing would be left to train "
                f"on after the validation set (--stream_val_tokens {self.val_tokens:,}) or it cannot hold the "
                f"validation budget ({self.keep_val_tokens:,} tokens). Lower --stream_val_tokens or --val_tokens."
            )
        self._validation = head
        if find_boundary:
            self._boundary = boundary

    @property
    def validation_tokens(self) -> np.ndarray:
        """The stream's first keep_val_tokens tokens: the start of data_prep.py's val shard (iter_val_batches)."""
        if self._validation is None:
            self._scan(find_boundary=self._boundary is None)
        return self._validation

    def _training_stream(self):
        """This process's documents after the validation set, as a fresh `datasets` stream."""
        from datasets.distributed import split_dataset_by_node

        ds = _text_stream().open_text_stream(*self._source).dataset.skip(self._boundary[0])
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, self.rank, self.world_size, strategy="examples")
        return ds

    def _epoch_blocks(self, epoch: int, at: dict | None) -> Iterator[_Block]:
        """The blocks of one epoch, from `at` (a resume point of this epoch) or from its start."""
        ts = _text_stream()
        lead = (
            self._boundary[1] if self.rank == 0 else 0
        )  # the validation part of the first document
        at = at or {"dataset_state": None, "skip_tokens": lead, "shard_filled": 0}
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
            pieces = ts.cut_shards(
                batches, lambda _: size, filled=at["shard_filled"], skip=at["skip_tokens"]
            )
            windows = _cut_windows(pieces, self.seq_len, at["shard_filled"])
            if not self.shuffle:
                for w, starts in windows:
                    yield _Block(w, starts, epoch, 0, 0, False)
                return
            index, served, parts, have, first = (
                at.get("block", 0),
                at.get("block_served", 0),
                [],
                0,
                None,
            )
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
        order = np.random.default_rng([self.seed, self.rank, epoch, index]).permutation(
            len(windows)
        )
        return _Block(windows[order[served:]], [first], epoch, index, served, True)

    def _blocks(self, start: dict | None) -> Iterator[_Block]:
        """Blocks of windows from `start` on, epoch after epoch."""
        epoch = start["epoch"] if start else 0
        while True:
            served = 0
            for block in self._epoch_blocks(epoch, start):
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
                target=self._read,
                args=(self._start, ready, stop),
                name="stream-reader",
                daemon=True,
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

    # ---- the loader interface (TokenShardLoader's)

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
        self._start = {k: state[k] for k in keys}
        self._boundary = tuple(state["validation_end"])
        self._block, self._served, self._failure = None, 0, None
