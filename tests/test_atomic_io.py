"""base/atomic_io.py: whole-or-absent files and folders, with the permissions a plain open() would give."""

import os
import re
import stat
from pathlib import Path

import pytest

from gpt2_repro.base.atomic_io import link_tree, write_atomic, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_link_tree_replaces_a_folder_with_hard_links(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a.txt").write_text("new")
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    link_tree(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["a.txt"]
    assert (dst / "a.txt").stat().st_ino == (src / "a.txt").stat().st_ino  # no second copy on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_follow_the_umask_like_open(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "results.json", "{}")
        write_json_atomic(tmp_path / "manifest.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # what a plain open() gives, for comparison
            f.write("x")
    finally:
        os.umask(old)
    for name in ("results.json", "manifest.json", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_no_other_module_creates_files_with_mkstemp():
    """mkstemp makes 0600 files: only atomic_io may call it (it fixes the mode)."""
    sources = [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]
    assert len(sources) > 10
    users = [
        p.name for p in sources if re.search(r"mkstemp|NamedTemporaryFile", p.read_text()) and p.name != "atomic_io.py"
    ]
    assert users == []


def test_strict_json_writes_null_for_non_finite_numbers(tmp_path):
    import json

    write_json_atomic(tmp_path / "r.json", {"loss": float("nan"), "x": [float("inf"), 1.5]})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"loss": None, "x": [None, 1.5]}
