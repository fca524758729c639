"""run_folder.py: one run per folder (a lock the OS releases), and the history of attempts."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from cli import RunError
from run_folder import LOCK_NAME, RunLock, config_changes, record_attempt


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
            "import sys, time; from run_folder import RunLock; RunLock(sys.argv[1]).acquire(); "
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


def test_each_attempt_is_recorded_with_what_changed():
    first_cfg = {"optim": {"max_lr": 6e-4, "max_steps": 100}, "data": {"seq_len": 1024}}
    info = {
        "command": ["train.py"],
        "git_commit": "a",
        "num_processes": 8,
        "versions": {"torch": "2.1"},
    }
    first = record_attempt(info, None, None, first_cfg, start_step=0, resumed_from=None)
    assert len(first["attempts"]) == 1 and first["attempts"][0]["changed"] == {}
    assert first["num_processes"] == 8  # the newest facts stay at the top level
    second_cfg = {"optim": {"max_lr": 3e-4, "max_steps": 100}, "data": {"seq_len": 1024}}
    info2 = {**info, "git_commit": "b", "num_processes": 4, "versions": {"torch": "2.2"}}
    second = record_attempt(info2, first, first_cfg, second_cfg, start_step=50, resumed_from="ck")
    assert [a["start_step"] for a in second["attempts"]] == [0, 50]
    assert second["attempts"][1]["changed"] == {
        "max_lr": [6e-4, 3e-4],
        "num_processes": [8, 4],
        "git_commit": ["a", "b"],
        "versions.torch": ["2.1", "2.2"],
    }
    assert config_changes(None, second_cfg) == {}
