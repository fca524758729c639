"""Windows of T + 1 tokens as batches: `as_xy` makes the (x, y) pairs every loader serves, and the validation
batches take a fixed budget of the val split's first tokens, the same windows whatever the batch size or process
count. The val split is a folder or glob of shards (their val split), or a stream's first tokens (the same tokens
data_prep.py would write to its val shard)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..base.errors import DataError
from .shards import find_shards, read_shard

if TYPE_CHECKING:
    import torch


def as_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): int64 CPU tensors of shape (n, T) from (n, T+1) token windows, y = x shifted by one.

    torch is imported here rather than with the module: data_prep.py uses this module without torch (2 s less
    start-up).
    """
    import torch

    return (torch.from_numpy(windows[:, :-1].astype(np.int64)), torch.from_numpy(windows[:, 1:].astype(np.int64)))


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


def val_batch_counts(val_tokens: int, seq_len: int, batch_size: int, world_size: int) -> list[int]:
    """How many batches iter_val_batches yields to each rank (the busiest first), known without reading the data."""
    n_windows = val_tokens // seq_len
    return [-(-len(range(rank, n_windows, world_size)) // batch_size) for rank in range(world_size)]


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
