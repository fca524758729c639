"""Training batches from token shards (`shards.py`): `TokenShardLoader`, a data source (`source.py`) that serves
(B, T) batches by memory map, each rank its own windows, with exact resume. Validation batches: `validation.py`.
The streaming loader (`stream_loader.py`) serves the same batches straight from a text stream.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..base.atomic_io import json_fields_problem
from ..base.errors import ConfigError, DataError
from .shards import (
    check_shards,
    find_shards,
    manifest_source,
    prep_command,
    read_manifest,
    read_shard,
    shards_fingerprint,
)
from .windows import as_xy, val_windows

if TYPE_CHECKING:
    import torch

    from ..base.config import TrainConfig

logger = logging.getLogger(__name__)


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

    # ---- before a run: the data source's checks (source.py)

    @classmethod
    def preflight(cls, cfg: TrainConfig) -> None:
        """No prepared data, an unfinished preparation or too little validation data for val_tokens is refused."""
        data_dir = cfg.data.data_dir
        if not glob.glob(data_dir):
            raise ConfigError(
                f"no training shards in data_dir={data_dir!r}. Prepare them first, e.g. "
                f"`python data_prep.py --dataset my_text.txt --output_dir {data_dir}` (see the README), "
                f"or pass --data_dir."
            )
        manifest = read_manifest(data_dir) if Path(data_dir).is_dir() else None
        if manifest is not None and manifest.get("complete") is False:
            done = len(manifest.get("shards", []))
            raise DataError(
                f"{data_dir} is unfinished: data_prep.py stopped after {done} shard(s) (manifest.json says "
                f"complete: false), and the shards still to come would change the data under a run. Finish it "
                f"first: `{prep_command(data_dir, manifest)}`."
            )
        val_windows(data_dir, cfg.data.seq_len, cfg.eval.val_tokens)  # DataError if too short

    @classmethod
    def verify(cls, cfg: TrainConfig, log) -> None:
        """Check every shard against the SHA-256 in the data's manifest.json (data_prep.py wrote it), once per
        start (main process): about 0.25 s per 100M-token shard and core (bench/bench_verify.py)."""
        data_dir = cfg.data.data_dir
        if not cfg.data.verify_data or not Path(data_dir).is_dir():  # a glob or a file has no manifest
            return
        start = time.perf_counter()
        if check_shards(data_dir):
            log(f"data: every shard matches manifest.json ({time.perf_counter() - start:.1f}s)")
        else:
            log(
                f"warning: {data_dir} has no manifest.json, so its shards cannot be checked against the SHA-256 "
                "data_prep.py records (prepared elsewhere, or the manifest was deleted); --verify_data false says "
                "it is known"
            )

    @classmethod
    def resume_facts(cls, cfg: TrainConfig) -> dict:
        """The training shards now: their fingerprint and, to name what changed, [name, tokens] of each."""
        files = find_shards(cfg.data.data_dir, "train")
        lengths = [len(read_shard(f)) for f in files]
        return {
            "shards": shards_fingerprint(files, lengths),
            "shard_files": [[f.name, n] for f, n in zip(files, lengths, strict=True)],
        }

    @classmethod
    def resume_problems(cls, saved: dict, now: dict, saved_data: dict | None, now_data: dict | None) -> list[str]:
        """A checkpoint of a streamed run, or one whose training shards are not these (the fingerprint its loader
        state saved, "shards", against now's; the [name, tokens] list it recorded, "shard_files", names what
        changed; a checkpoint without the list says only that they differ). Shards moved elsewhere are fine."""
        if saved.get("dataset") is not None:
            return [f"dataset: {saved['dataset']!r} in the checkpoint, None now"]
        if not (saved_data and now_data and saved_data.get("shards")) or saved_data["shards"] == now_data["shards"]:
            return []
        return ["data: the training shards are not the checkpoint's (" + _shard_changes(saved_data, now_data) + ")"]

    @classmethod
    def elastic_problem(cls, checkpoint, saved_processes: int, num_processes: int) -> None:
        """None: the position is global, so any process count continues from it."""
        return None

    @classmethod
    def position_problem(cls, state) -> str | None:
        """A position is state_dict's fields, with a count of windows that is not negative."""
        fields = {"consumed_windows": (int,), "seed": (int,), "shuffle": (bool,), "seq_len": (int,), "shards": (str,)}
        problem = json_fields_problem(state, fields)
        if problem is None and state["consumed_windows"] < 0:
            problem = f"the data position's 'consumed_windows' is {state['consumed_windows']}, below 0"
        return problem

    @classmethod
    def from_config(cls, cfg: TrainConfig, rank: int, world_size: int) -> TokenShardLoader:
        data = cfg.data
        return cls(
            data.data_dir, "train", data.micro_batch_size, data.seq_len, rank, world_size, cfg.run.seed, data.shuffle
        )

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
        self.data_dir = str(data_dir_or_glob)
        self.files = find_shards(data_dir_or_glob, split)
        self.shards = [read_shard(f) for f in self.files]
        # Each shard's mapped bytes: a file truncated in place under the map would kill the process with SIGBUS
        # at the first read past its new end, so the size is checked before windows are read (`_intact`).
        self._mapped = [_map_of(shard) for shard in self.shards]
        self._bytes = [None if m is None else m.size() for m in self._mapped]
        self._manifest = None  # what data_prep.py recorded: how to make the data again (restore_hint)
        if Path(self.data_dir).is_dir():
            with contextlib.suppress(DataError):
                self._manifest = read_manifest(self.data_dir)
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
            self._intact(int(order[j]))
            view, perm = self._shard_windows(epoch, int(order[j]))
            take = min(count - done, len(perm) - local)
            out[done : done + take] = view[perm[local : local + take]]
            done += take
        return out

    def _intact(self, shard: int) -> None:
        """DataError when shard `shard` is shorter than when it was mapped (truncated or rewritten in place): its
        windows past the new end cannot be read (reading them would end the process with SIGBUS, no word said)."""
        mapped, size = self._mapped[shard], self._bytes[shard]
        if mapped is None or mapped.size() >= size:
            return
        raise DataError(
            f"{self.files[shard]} shrank from {size:,} to {mapped.size():,} bytes while training read it (truncated "
            "or rewritten in place, not replaced). Restore it (python data_prep.py --verify names what differs from "
            "manifest.json), then continue with --resume latest: the checkpoints already written are whole."
        )

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
        """Nothing to release (memory maps close with the loader)."""

    @property
    def validation_data(self) -> str:
        """The shards' folder (or glob): `iter_val_batches` reads its val split."""
        return self.data_dir

    @property
    def identity(self) -> dict | None:
        """The source data_prep.py recorded in the folder's manifest.json (None: no manifest)."""
        return manifest_source(self.data_dir)

    def checkpoint_facts(self) -> dict:
        return {"shard_files": self.shard_files()}

    def report(self) -> None:
        """Nothing to tell: data_prep.py reported what it skipped."""
        return None

    def restore_hint(self) -> str:
        """The folder's source and the command that prepares it again (its manifest.json, read at start)."""
        if self._manifest is None:
            return f"Restore {self.data_dir} (it had no manifest.json from data_prep.py, so its source is not known)."
        dataset = (self._manifest.get("source") or {}).get("dataset")
        return (
            f"Restore {self.data_dir}, or prepare it again from its source, {dataset}: "
            f"`{prep_command(self.data_dir, self._manifest)}`."
        )

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
            raise DataError(
                f"Loader state does not match this loader ({diffs}); 'shards' differs when the shard files changed "
                "since the checkpoint. Resume with the same data, seed, shuffle and seq_len."
            )
        self._consumed = int(state["consumed_windows"])


def _map_of(shard: np.ndarray):
    """The mmap.mmap under a memory-mapped shard (None for one in memory, such as an empty shard)."""
    while shard is not None and not isinstance(shard, np.memmap):
        shard = shard.base if isinstance(shard.base, np.ndarray) else None
    return getattr(shard, "_mmap", None)


def _shard_changes(saved: dict, now: dict) -> str:
    """What differs between two shard lists: files added, removed, or of another length."""
    if not saved.get("shard_files"):
        return "their names or sizes changed since it was saved"
    before, after = dict(map(tuple, saved["shard_files"])), dict(map(tuple, now["shard_files"]))
    changes = [f"{n} is new" for n in after if n not in before] + [f"{n} is gone" for n in before if n not in after]
    changes += [
        f"{n}: {before[n]:,} tokens then, {after[n]:,} now" for n in before if n in after and before[n] != after[n]
    ]
    return "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
