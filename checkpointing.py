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
import tempfile
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"  # our own: optimizer step, tokens seen, process count, config


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temporary and half-deleted folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """`--resume latest` -> the newest complete checkpoint under root (None: fresh start); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if path.is_dir() and not (path / TRAINER_STATE).is_file() and list_checkpoints(path / "checkpoints"):
        return list_checkpoints(path / "checkpoints")[-1][1]  # a run folder: its newest checkpoint
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a checkpoint folder (no {TRAINER_STATE} in {path}). Pass a "
            f"checkpoints/step_XXXXXXXX folder, a run folder, or 'latest'."
        )
    return path


def read_trainer_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary name in the same folder, then rename: a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


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


def _remove(path: Path) -> None:
    """Rename away, then delete: an interrupted delete leaves a `.trash-` folder, never a partial checkpoint."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def temp_checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where every process writes checkpoint `step` before it is committed (same path on every rank)."""
    return Path(root) / f".tmp-{checkpoint_name(step)}"


def commit_checkpoint(tmp: Path, keep_last: int) -> Path:
    """Main process, after every rank finished writing `tmp`: fsync, rename into place, then rotate."""
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    _fsync_tree(tmp)
    if final.exists():  # this exact step was saved before: move it aside only now that its successor is whole
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for _, old in list_checkpoints(final.parent)[:-keep_last]:
        _remove(old)
    for leftover in final.parent.glob(".t*-step_*"):  # .tmp-/.trash- folders of an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def link_tree(src: str | Path, dst: str | Path) -> None:
    """Make `dst` a copy of folder `src` using hard links (a plain copy where links are impossible).

    The copy is built beside `dst` and swapped in, so `dst` is always a whole folder. Hard links cost no disk
    space and outlive the source: the run's export/ stays valid after its checkpoint is rotated away.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link_or_copy)
    _remove(dst)
    os.replace(tmp, dst)


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
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
