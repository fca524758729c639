"""base/lock.py: one writer per folder: a lock the OS releases, naming its holder."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from gpt2_repro.base.errors import RunError
from gpt2_repro.base.lock import LOCK_NAME, RunLock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunError, match=rf"in use by another run \(pid {os.getpid()} on host"):
            RunLock(run).acquire()
        assert socket.gethostname() in (run / LOCK_NAME).read_text()
    with RunLock(run):  # released: free again
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from gpt2_repro.base.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match=f"pid {holder.pid}"):
        RunLock(run).acquire()
    holder.kill()
    holder.wait()
    with RunLock(run):  # the OS released it with the process
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_lock_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with RunLock(tmp_path / "run"):
            mode = stat.S_IMODE((tmp_path / "run" / LOCK_NAME).stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o644
