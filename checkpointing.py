"""Checkpoint folders that are either complete or absent.

Layout of a run folder:

    checkpoints/step_00000500/      one complete training state (accelerate save_state + our files + exports)
    checkpoints/.tmp-step_00001000/ being written; renamed to step_00001000 only once every process has finished
    export/, export-gpt2/           hard-linked copies of the newest checkpoint's exports (no extra disk space)

A checkpoint is written under a temporary name and renamed when whole (a rename is atomic on POSIX file systems),
so a crash leaves either the old set or the new one, never a half-written "latest". Rotation deletes the oldest
complete checkpoints only after the new one has been renamed into place, and renames a folder away before
deleting it, so a half-deleted checkpoint never looks complete either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from atomic_io import remove_tree, write_atomic

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"  # our own: optimizer step, tokens seen, process count, config


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temporary and half-deleted folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return sorted(found)


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """`--resume latest` -> the newest complete checkpoint under root (None: fresh start); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if (
        path.is_dir()
        and not (path / TRAINER_STATE).is_file()
        and list_checkpoints(path / "checkpoints")
    ):
        return list_checkpoints(path / "checkpoints")[-1][1]  # a run folder: its newest checkpoint
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a checkpoint folder (no {TRAINER_STATE} in {path}). Pass a "
            f"checkpoints/step_XXXXXXXX folder, a run folder, or 'latest'."
        )
    return path


def read_trainer_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folders themselves, so the rename that follows commits durable data."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where every process writes checkpoint `step` before it is committed (same path on every rank)."""
    return Path(root) / f".tmp-{checkpoint_name(step)}"


def commit_checkpoint(tmp: Path, keep_last: int) -> Path:
    """Main process, after every rank finished writing `tmp`: fsync, rename into place, then rotate."""
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    _fsync_tree(tmp)
    if (
        final.exists()
    ):  # this exact step was saved before: move it aside only now that its successor is whole
        remove_tree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for _, old in list_checkpoints(final.parent)[:-keep_last]:
        remove_tree(old)
    for leftover in final.parent.glob(".t*-step_*"):  # .tmp-/.trash- folders of an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop the log lines of steps after `step` (they were run after the checkpoint we resume from, and are redone)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # the half-written last line of a killed run
    write_atomic(path, "".join(line + "\n" for line in kept))
