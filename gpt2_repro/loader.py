"""Training and validation batches from token shards (`shards.py`).

- `TokenShardLoader`: (B, T) training batches by memory map, each rank its own windows, exact resume;
- `iter_val_batches`: a fixed validation budget, the same windows whatever the batch size or process count.

The streaming loader (`stream_loader.py`) serves the same batches straight from a text stream.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError
from .shards import find_shards, read_shard, shards_fingerprint

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def as_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): int64 CPU tensors of shape (n, T) from (n, T+1) token windows, y = x shifted by one.

    torch is imported here rather than with the module: data_prep.py uses this module without torch (2 s less
    start-up).
    """
    import torch

    return (torch.from_numpy(windows[:, :-1].astype(np.int64)), torch.from_numpy(windows[:, 1:].astype(np.int64)))


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
        self.batch_size, self.seq_len, self.rank, self.world_size = (batch_size, seq_len, rank, world_size)
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

    def shard_files(self) -> list[list]:
        """[name, tokens] of each shard: what the fingerprint in state_dict stands for (a checkpoint records it once,
        to name what changed if the data does)."""
        return [[f.name, len(shard)] for f, shard in zip(self.files, self.shards, strict=True)]

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
    windows = val_windows(source, seq_len, val_tokens)  # (n, T+1)
    mine = np.arange(rank, len(windows), world_size)
    for i in range(0, len(mine), batch_size):
        yield as_xy(windows[mine[i : i + batch_size]])


def val_split(source: str | os.PathLike | np.ndarray) -> tuple[list[np.ndarray], str, str]:
    """(the val split's token arrays, how to name it, the option that sizes it) of a shard folder or glob, or of a
    stream's first tokens."""
    if isinstance(source, np.ndarray):
        return [source], "The stream's validation set", "--stream_val_tokens"
    return (
        [read_shard(f) for f in find_shards(source, "val")],
        f"The val split at {source}",
        "data_prep.py --val_tokens",
    )


def val_windows(source: str | os.PathLike | np.ndarray, seq_len: int, val_tokens: int) -> np.ndarray:
    """The first val_tokens // T validation windows of T + 1 tokens, every T tokens: a (n, T+1) uint16 view (a copy
    only where they span shards). DataError when the split is shorter than they need."""
    n_windows = val_tokens // seq_len
    if n_windows < 1:
        raise ValueError(f"val_tokens ({val_tokens}) must be at least seq_len ({seq_len})")
    need = n_windows * seq_len + 1
    shards, where, fix = val_split(source)
    have = sum(len(s) for s in shards)
    if have < need:
        raise DataError(
            f"{where} has {have:,} tokens, fewer than the {need:,} needed for val_tokens={val_tokens:,} at "
            f"seq_len={seq_len} (+1 for the last target). Ask for fewer val tokens or a larger validation set "
            f"({fix})."
        )
    pieces, left = [], need  # the first `need` tokens of the val shards
    for shard in shards:
        pieces.append(shard[:left])
        left -= len(pieces[-1])
        if not left:
            break
    tokens = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len]
