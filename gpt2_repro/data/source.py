"""Where training batches come from: one interface, `DataSource`, and the one place that picks its kind.

Two kinds implement it: `TokenShardLoader` (token shards written by data_prep.py, `--data_dir`) and
`StreamingTokenLoader` (a `datasets` text stream tokenized on the fly, `--dataset`). `source_type` is the only code
that tells them apart; the trainer, the checkpoints and the evaluation speak to the interface:

- before anything starts (a class, no loader yet): `preflight` refuses data that is missing, unfinished or
  unreadable, `verify` checks its integrity; `resume_facts` and `resume_problems` say whether a checkpoint's data
  position still means the same data, `elastic_problem` whether it can resume with another process count,
  `position_problem` whether a saved position is one of this kind of source at all (a checkpoint's loader file);
- a built source (`open_data_source`): `next_batch`, its position (`state_dict` / `load_state_dict`, a DataError
  when the position belongs to other data), `close`, `validation_data` (what `validation_loss` reads: the same
  tokens data_prep.py writes to the val shard), `identity` (what the data is: the run record and the model card
  name it), `checkpoint_facts` (what a checkpoint records beside the position), `report` (what reading it
  found: a stream's skipped documents) and `restore_hint` (how to bring it back should it disappear).

Every source shards by process itself: never pass it through `accelerator.prepare`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import torch

    from ..base.config import TrainConfig


class DataSource(Protocol):
    """This process's training batches, its position in the data, and what the data is."""

    @classmethod
    def preflight(cls, cfg: TrainConfig) -> None:
        """Refuse data that cannot serve this run (missing, unfinished, unreadable, too short to validate on),
        before anything is written: quick checks, made by every process."""

    @classmethod
    def verify(cls, cfg: TrainConfig, log) -> None:
        """Check the data's integrity where it can be checked (the shards' SHA-256): the main process, once per
        start, once the run folder is claimed."""

    @classmethod
    def resume_facts(cls, cfg: TrainConfig) -> dict | None:
        """What the data is now, in the form a checkpoint recorded it (None: nothing to compare)."""

    @classmethod
    def resume_problems(cls, saved: dict, now: dict, saved_data: dict | None, now_data: dict | None) -> list[str]:
        """Why a checkpoint's data position would not mean the same data now, one "name: then, now" per setting:
        `saved` and `now` are the checkpoint's and this run's options (flat), `saved_data` the checkpoint's data
        facts (its loader state with its `checkpoint_facts`), `now_data` this run's `resume_facts`."""

    @classmethod
    def elastic_problem(cls, checkpoint: Path, saved_processes: int, num_processes: int) -> str | None:
        """Why a checkpoint saved by `saved_processes` cannot resume with `num_processes` (None: it can)."""

    @classmethod
    def position_problem(cls, state) -> str | None:
        """Why `state` (a saved `state_dict`, as read from a checkpoint) is not a position of this kind of source:
        not a mapping, a field missing or of the wrong type (None: it is one). Whether it fits this run's data and
        settings is `resume_problems`'."""

    @classmethod
    def from_config(cls, cfg: TrainConfig, rank: int, world_size: int) -> DataSource:
        """This process's source for a training run."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) of this process: int64 CPU tensors of shape (B, T), y = x shifted by one."""

    def state_dict(self) -> dict:
        """Where the next batch starts (JSON-serializable)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken; DataError when it belongs to other data or settings."""

    def close(self) -> None:
        """Release readers (threads, files); a later next_batch starts them again."""

    @property
    def validation_data(self) -> str | np.ndarray:
        """What `iter_val_batches` reads: a folder or glob of shards, or the validation tokens themselves."""

    @property
    def identity(self) -> dict | None:
        """What the data is (dataset, files, revision): recorded with the run and named on the model card."""

    def checkpoint_facts(self) -> dict:
        """Facts about the data a checkpoint records with the position (to name what changed if the data does)."""

    def report(self) -> str | None:
        """A line on what reading the data found since the last report (a stream: documents skipped), or None:
        logged at each checkpoint."""

    def restore_hint(self) -> str | None:
        """How to bring the data back should it disappear during the run (a folder removed or moved), or None."""


def source_type(dataset: str | None) -> type[DataSource]:
    """The kind of source a run reads: a stream when it names one (`--dataset`), else token shards (`--data_dir`)."""
    if dataset is not None:
        from .stream_loader import StreamingTokenLoader

        return StreamingTokenLoader
    from .shard_loader import TokenShardLoader

    return TokenShardLoader


def open_data_source(cfg: TrainConfig, rank: int, world_size: int) -> DataSource:
    """This process's training batches for `cfg` (rank of world_size)."""
    return source_type(cfg.data.dataset).from_config(cfg, rank, world_size)
