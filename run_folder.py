"""The run folder's own bookkeeping: one run at a time (a lock), and the history of its attempts.

- `RunLock`: an exclusive `fcntl.flock` on `<run folder>/.lock`, held by the main process for the whole run. The
  operating system releases it when the holder exits in any way (SIGKILL included), so a stale lock cannot
  exist; a second run into the same folder is refused at once, naming the holder (pid, host, start time, which the
  holder writes into the file). flock works on local file systems and on NFS (Linux emulates it with NFS byte-range
  locks); where it is not supported the run goes on with a warning.
- `record_attempt`: run_info.json keeps the facts of the newest attempt at its top level (as before) plus
  `attempts`, one entry per start or resume with what changed since the previous one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import yaml

from cli import RunError, flat_options

LOCK_NAME = ".lock"


class RunLock:
    """`with RunLock(folder):` holds the folder for this process, or raises RunError naming the holder."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self.warning: str | None = None  # set when the file system cannot lock

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunError(
                    f"{self.path.parent} is in use by another run ({self.holder()}). Two runs in one folder "
                    "would mix their metrics and checkpoints: wait for it to end (or stop it), or choose another "
                    "--output_dir."
                ) from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                self.warning = (
                    f"warning: {self.path.parent}'s file system cannot lock files ({e.strerror}): a second run "
                    "into this folder would not be detected"
                )
                return self
            raise
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """The holder as the lock file describes it ("pid 123 on host gpu7, since ...")."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on host {info['host']}, since {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"its lock file is {self.path}"

    def release(self) -> None:
        # The file stays: deleting it would let a third run lock a new file while a second holds the old one.
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ attempt history


def config_changes(before: dict | None, after: dict) -> dict[str, list]:
    """{option: [before, after]} for every option whose value differs (sectioned or flat configs)."""
    if not before:
        return {}
    old, new = flat_options(before), flat_options(after)
    return {k: [old.get(k), new.get(k)] for k in new if old.get(k) != new.get(k)}


def read_previous(run_dir: Path) -> tuple[dict | None, dict | None]:
    """(config.yaml, run_info.json) of the previous attempt in `run_dir`, None where absent or unreadable."""
    config = info = None
    with contextlib.suppress(OSError, yaml.YAMLError):
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((run_dir / "run_info.json").read_text())
    return (config if isinstance(config, dict) else None), (
        info if isinstance(info, dict) else None
    )


def record_attempt(
    info: dict, previous_info: dict | None, previous_config: dict | None, config: dict, **attempt
) -> dict:
    """run_info.json's new content: this attempt's facts on top, and the history with this attempt appended.

    `attempt` holds what the trainer knows (start step, the checkpoint resumed from, ...); what changed since the
    previous attempt is added: config options, process count, code commit, library versions.
    """
    history = list((previous_info or {}).get("attempts", []))
    if previous_info and not history:  # a run folder from before the history existed
        history.append({"started": None, "git_commit": previous_info.get("git_commit")})
    changed = config_changes(previous_config, config)
    if previous_info:
        for key in ("num_processes", "git_commit"):
            if key in previous_info and previous_info.get(key) != info.get(key):
                changed[key] = [previous_info.get(key), info.get(key)]
        old_versions, new_versions = previous_info.get("versions") or {}, info.get("versions") or {}
        for lib, version in new_versions.items():
            if lib in old_versions and old_versions[lib] != version:
                changed[f"versions.{lib}"] = [old_versions[lib], version]
    entry = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": socket.gethostname(),
        "command": info.get("command"),
        "git_commit": info.get("git_commit"),
        "num_processes": info.get("num_processes"),
        **attempt,
        "changed": changed,
    }
    return {**info, "attempts": [*history, entry]}
