"""One writer per folder: an exclusive `fcntl.flock` on `<folder>/.lock`, held for as long as the writer runs.

The operating system releases the lock when its holder exits in any way (SIGKILL included), so a stale lock cannot
exist; a second writer into the same folder (a training run, or data_prep.py) is refused at once, naming the holder
(pid, host, start time, which the holder writes into the file). flock works on local file systems and on NFS (Linux
emulates it with NFS byte-range locks); where it is not supported the writer goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import RunError

LOCK_NAME = ".lock"


class RunLock:
    """`with RunLock(folder):` holds the folder for this process, or raises RunError naming the holder.

    `user` and `contents` name who else would write there and what they would mix (a training run: its metrics and
    checkpoints; data_prep.py: its shards)."""

    def __init__(self, folder: str | Path, user: str = "run", contents: str = "metrics and checkpoints"):
        self.path = Path(folder) / LOCK_NAME
        self.user, self.contents = user, contents
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
                    f"{self.path.parent} is in use by another {self.user} ({self.holder()}). Two {self.user}s in one "
                    f"folder would mix their {self.contents}: wait for it to end (or stop it), or choose another "
                    "--output_dir."
                ) from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                self.warning = (
                    f"warning: {self.path.parent}'s file system cannot lock files ({e.strerror}): a second "
                    f"{self.user} into this folder would not be detected"
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
        os.fsync(fd)  # other machines read it (training/accelerator.py: a shared folder), NFS once it is flushed
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
