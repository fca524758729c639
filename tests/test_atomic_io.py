"""atomic_io.py: whole-or-absent files and folders."""

from atomic_io import link_tree


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
