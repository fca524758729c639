"""Where a run resumes: the checkpoint to continue, whether it fits the settings, and the line of training it
continues or starts.

- `find_checkpoint` (every process, before anything is written): `--resume latest` takes the newest checkpoint that
  can be read, skipping (one line each) those that cannot (`checkpoint.checkpoint_problem`); a path that names an
  unreadable checkpoint is refused, naming the older ones. Settings that do not fit the checkpoint's are refused.
- `start_line` (main process): a resume from a checkpoint older than the folder's newest starts a new line of
  training. The checkpoints of the line it leaves (those after the resumed step) move to
  `checkpoints/abandoned/line-<N>-after-step_<S>/`, with their metrics.jsonl lines: kept, but never taken as
  `latest` and never rotated away by the new line's checkpoints. metrics.jsonl lines from line 2 on carry
  `"line": N`, and run_info.json records each attempt's line.
- `refresh_export` (main process, every start): export/ and export-gpt2/ are made the newest checkpoint's again if
  a run was killed between committing a checkpoint and linking it, and leftovers of an interrupted save or rotation
  are removed.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

from .atomic_io import link_tree
from .checkpoint import (
    ABANDONED,
    STOCK_EXPORT,
    checkpoint_problem,
    list_checkpoints,
    model_files,
    read_run_state,
    resolve_resume,
)
from .cli import flat_options
from .config import TrainConfig
from .errors import ConfigError, RunError
from .shards import find_shards, read_shard, shards_fingerprint

# What a checkpoint's state is bound to: the model's shapes, the optimizer (its state is saved), the batch per
# optimizer step (the LR schedule and the data position count steps of that many tokens), how the data is cut into
# windows and in which order (seq_len, seed, shuffle), and the data itself. Everything else (LRs, schedule,
# intervals, micro-batch, process count) may change.
RESUME_MUST_MATCH = (
    "optimizer",
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "vocab_size",
    "seq_len",
    "total_batch_tokens",
    "seed",
    "shuffle",
)
# A streamed run (--dataset) is bound to its stream and to the way it is cut into windows.
STREAM_MUST_MATCH = (
    "dataset",
    "dataset_name",
    "dataset_split",
    "text_column",
    "stream_val_tokens",
    "stream_shard_tokens",
    "stream_shuffle_windows",
)


def find_checkpoint(cfg: TrainConfig, run_dir: Path, num_processes: int, log) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), refused before anything is written when it does not
    fit: an earlier run's checkpoints without --resume, settings that differ from the checkpoint's, or a streamed
    run's checkpoint resumed by another number of processes than the `num_processes` that saved it. Unreadable
    checkpoints are skipped by `--resume latest` (one line each) and refused when named by path."""
    root, resume = run_dir / "checkpoints", cfg.checkpoint.resume
    if not resume:
        if list_checkpoints(root):
            raise ConfigError(
                f"{run_dir} already holds checkpoints of an earlier run. Continue it with --resume latest, "
                f"or train from scratch in another --output_dir."
            )
        return None
    latest = resume == "latest"
    candidates = [p for _, p in reversed(list_checkpoints(root))] if latest else [resolve_resume(resume, root)]
    for found in candidates:
        problem = checkpoint_problem(found, deep=False)
        if problem is None:
            _check_fits(cfg, found, num_processes)  # a refusal, not a fallback: the settings are the user's
            problem = checkpoint_problem(found)
        if problem is None:
            return found
        if not latest:
            raise RunError(f"{found} cannot be resumed: {problem}. {_older_ones(found)}")
        log(f"warning: skipping {found}: {problem}; trying the next older checkpoint")
    if not candidates:
        return None
    raise RunError(
        f"no checkpoint in {root} can be read (each was skipped above): restore the files, or train from scratch "
        "in another --output_dir"
    )


def _older_ones(found: Path) -> str:
    """What to resume instead of the unreadable checkpoint `found`."""
    step = read_run_state(found).get("step") if (found / "run_state.json").is_file() else None
    older = [p for s, p in list_checkpoints(found.parent) if p != found and (step is None or s < step)]
    if not older:
        return "No older checkpoint to fall back on: restore the files, or train from scratch in another --output_dir."
    return f"Resume an older one by path: --resume {older[-1]}" + (
        f" (older still: {', '.join(p.name for p in older[:-1])})" if len(older) > 1 else ""
    )


def _check_fits(cfg: TrainConfig, found: Path, num_processes: int) -> None:
    """ConfigError naming every setting that differs from the checkpoint's (nothing is changed)."""
    state = read_run_state(found)
    saved_data = json.loads((found / "loader_rank0.json").read_text()) | {"shard_files": state.get("shard_files")}
    now_data = _shard_list(cfg.data.data_dir) if cfg.data.dataset is None else None
    problems = resume_mismatches(state, cfg.to_dict(), saved_data, now_data)
    if problems:
        config = found.parent.parent / "config.yaml"
        raise ConfigError(
            f"{found} cannot be resumed with these settings: " + "; ".join(problems) + ". Nothing was changed. "
            f"Resume with the checkpoint's values (`--config {config} --resume latest` has them), or train from "
            "scratch in another --output_dir."
        )
    saved_processes = state.get("num_processes", num_processes)
    if saved_processes != num_processes and cfg.data.dataset is not None:
        raise ConfigError(
            f"{found} was saved by {saved_processes} processes reading the stream --dataset, each at its own "
            f"position in it, so it resumes with {saved_processes} processes, not {num_processes} "
            f"(`accelerate launch --num_processes {saved_processes} ...`). Runs on prepared shards (--data_dir) can "
            "change the process count."
        )


def _shard_list(data_dir: str) -> dict:
    """The training shards now: their fingerprint and, to name what changed, [name, tokens] of each."""
    files = find_shards(data_dir, "train")
    lengths = [len(read_shard(f)) for f in files]
    return {
        "shards": shards_fingerprint(files, lengths),
        "shard_files": [[f.name, n] for f, n in zip(files, lengths, strict=True)],
    }


def resume_mismatches(state: dict, config: dict, saved_data: dict | None, current_data: dict | None) -> list[str]:
    """Each setting of `config` (a TrainConfig as a dict) that differs from the checkpoint whose run state is
    `state`, as "name: saved in the checkpoint, now"; the data is compared by the training shards: the fingerprint
    its loader state saved ("shards") and the [name, tokens] list its run state recorded ("shard_files"), against
    the same of the shards now, and the differences are named (a checkpoint without the list says only that they
    differ)."""
    saved, now = flat_options(state.get("config") or {}), flat_options(config)
    saved.setdefault("seq_len", state.get("seq_len"))  # checkpoints that predate the saved config
    problems = [
        f"{key}: {saved[key]!r} in the checkpoint, {now.get(key)!r} now"
        for key in RESUME_MUST_MATCH
        if saved.get(key) is not None and saved[key] != now.get(key)
    ]
    if saved.get("dataset") is not None or now.get("dataset") is not None:  # a stream then or now
        keys = STREAM_MUST_MATCH if saved.get("dataset") and now.get("dataset") else ("dataset",)
        problems += [
            f"{key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now"
            for key in keys
            if saved.get(key) != now.get(key)
        ]
    if saved_data and current_data and saved_data.get("shards") and saved_data["shards"] != current_data["shards"]:
        problems.append(
            "data: the training shards are not the checkpoint's (" + _shard_changes(saved_data, current_data) + ")"
        )
    return problems


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


def start_line(run_dir: Path, found: Path | None, state: dict) -> tuple[int, Path | None]:
    """(the line of training this start continues or begins, the folder an abandoned line was moved to or None).

    A fresh start is line 1; a resume continues the checkpoint's line, unless the run folder holds checkpoints after
    the resumed step: then it begins the next line, and those checkpoints, with the metrics.jsonl lines of their
    steps, move to checkpoints/abandoned/ (main process; nothing is deleted).
    """
    if found is None:
        return 1, None
    step, line = state["step"], state.get("line", 1)
    root = run_dir / "checkpoints"
    later = [p for s, p in list_checkpoints(root) if s > step]
    if not later:
        return line, None
    left = max(_line_of(p) for p in later)
    aside = root / ABANDONED / f"line-{left}-after-step_{step:08d}"
    for n in range(2, 1000):  # the same step abandoned twice
        if not aside.exists():
            break
        aside = aside.with_name(f"line-{left}-after-step_{step:08d}-{n}")
    aside.mkdir(parents=True)
    for path in later:
        os.replace(path, aside / path.name)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [r for r in metrics.read_text().splitlines() if _step_of(r) is not None and _step_of(r) > step]
        (aside / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    return max(line, left) + 1, aside


def _line_of(checkpoint: Path) -> int:
    try:
        return int(read_run_state(checkpoint).get("line", 1))
    except (OSError, ValueError):
        return 1


def _step_of(row: str) -> int | None:
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def refresh_export(run_dir: Path, log) -> None:
    """Main process, at every start: remove what an interrupted save, rotation or link left, and make export/ and
    export-gpt2/ the newest checkpoint's again if they are not (a run killed after committing a checkpoint and
    before linking it left them at the previous one, for good)."""
    root = run_dir / "checkpoints"
    for leftover in [*root.glob(".tmp-step_*"), *root.glob(".trash-step_*"), *run_dir.glob(".t*-export*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    saved = list_checkpoints(root)
    if not saved:
        return
    step, newest = saved[-1]
    names = model_files(newest)
    stock = sorted(p.name for p in (newest / STOCK_EXPORT).iterdir())
    if _holds(run_dir / "export", newest, names) and _holds(run_dir / STOCK_EXPORT, newest / STOCK_EXPORT, stock):
        return
    link_tree(newest, run_dir / "export", names=names)
    link_tree(newest / STOCK_EXPORT, run_dir / STOCK_EXPORT)
    log(f"export/ and {STOCK_EXPORT}/ were behind: they now hold the newest checkpoint, {newest} (step {step})")


def _holds(export: Path, checkpoint: Path, names: list[str]) -> bool:
    """Whether `export` holds exactly the files `names` of `checkpoint` (the same files, or equal copies)."""
    if not export.is_dir() or sorted(p.name for p in export.iterdir()) != sorted(names):
        return False
    for name in names:
        a, b = export / name, checkpoint / name
        if not (os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)):
            return False
    return True
