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

import glob as globlib
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from atomic_io import atomic_write
from gpt2_tokenizer import get_gpt2_encoding
from hub import FINEWEB_EDU

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
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[
        ::seq_len
    ]  # (n_windows, T+1)
    mine = np.arange(rank, n_windows, world_size)
    for i in range(0, len(mine), batch_size):
        w = windows[mine[i : i + batch_size]]
        yield (
            torch.from_numpy(w[:, :-1].astype(np.int64)),
            torch.from_numpy(w[:, 1:].astype(np.int64)),
        )


# ----------------------------------------------------------------------------------------------------------------
# Streaming loader: train straight from a `datasets` stream


def _text_stream():
    """text_stream.py, imported on first use: only streaming needs it, and it imports this module (DataError)."""
    import text_stream

    return text_stream


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
        dataset: str = FINEWEB_EDU,
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
        self.rank, self.world_size, self.seed, self.shuffle_buffer = (
            rank,
            world_size,
            seed,
            shuffle_buffer,
        )
        self.text_column, self.batch_size, self.seq_len = text_column, batch_size, seq_len
        self.num_workers, self.batch_docs = num_workers, batch_docs
        self._epoch, self._skip, self._start_state = 0, 0, None
        self._restart()

    def _open(self):
        from datasets.distributed import split_dataset_by_node

        ds = _text_stream().open_text_stream(*self._source).dataset
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        return split_dataset_by_node(ds, self.rank, self.world_size) if self.world_size > 1 else ds

    def _restart(self) -> None:
        """(Re)open the stream at epoch self._epoch, state self._start_state, skipping self._skip tokens."""
        self.dataset = self._open()  # a fresh object: no stale starting state from an earlier load
        self.dataset.set_epoch(self._epoch)
        if self._start_state is not None:
            self.dataset.load_state_dict(self._start_state)
        self._batches = _text_stream().encoded_batches(
            self.dataset,
            self.text_column,
            self.encoding,
            self.num_workers,
            self.batch_docs,
            self._start_state,
        )
        self._chunks: deque = (
            deque()
        )  # [epoch, stream state before the batch, tokens, tokens already served]
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
                    raise DataError(
                        "The stream yields no tokens: every document is empty or not text"
                    ) from None
                self._epoch += 1
                self.dataset.set_epoch(self._epoch)
                self._batches = _text_stream().encoded_batches(
                    self.dataset,
                    self.text_column,
                    self.encoding,
                    self.num_workers,
                    self.batch_docs,
                    None,
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
        return torch.from_numpy(windows[:-1].reshape(B, T)), torch.from_numpy(
            windows[1:].reshape(B, T)
        )

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
        self._epoch, self._start_state, self._skip = (
            state["epoch"],
            state["dataset_state"],
            state["skip_tokens"],
        )
        self._restart()
