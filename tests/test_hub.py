"""publishing/hub.py: the background uploader and start-up check (a fake HfApi stands in for the network)."""

import shutil
import threading
import time
from pathlib import Path

import pytest

from gpt2_repro.publishing.hub import HubUploader


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi at the network boundary: records what would be sent."""

    def __init__(self, block: threading.Event | None = None, fail_with: str | None = None):
        self.block, self.fail_with = block, fail_with
        self.repos, self.branches, self.commits = [], [], []

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        self.repos.append((repo_id, repo_type, private, exist_ok))

    def create_branch(self, repo_id, branch, repo_type=None, exist_ok=False):
        self.branches.append((repo_id, branch, exist_ok))

    def upload_folder(self, repo_id, repo_type, folder_path, commit_message, revision=None, delete_patterns=None):
        if self.block is not None:
            self.block.wait(10)
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        files = {p.name: p.read_text() for p in Path(folder_path).iterdir()}
        self.commits.append((repo_id, commit_message, files, revision, delete_patterns))


def test_hub_uploader_never_blocks_and_keeps_the_newest(tmp_path):
    release = threading.Event()
    api = FakeHfApi(block=release)
    uploader = HubUploader("me/tiny", tmp_path / "staging", private=True, api=api)
    exports = []
    for step in (1, 2, 3):
        folder = tmp_path / f"export{step}"
        folder.mkdir()
        (folder / "config.json").write_text(f"step {step}")
        exports.append(folder)
    t0 = time.perf_counter()
    uploader.submit(exports[0], "step 1")  # starts uploading, blocked in the fake network
    time.sleep(0.2)
    uploader.submit(exports[1], "step 2")  # waits...
    uploader.submit(exports[2], "step 3")  # ...and is superseded by this one
    assert time.perf_counter() - t0 < 1.0  # submitting never waited for the network
    shutil.rmtree(exports[2])  # rotation deletes checkpoints: the snapshot taken at submit is what goes up
    release.set()
    assert uploader.close(timeout=10)
    assert [c[1] for c in api.commits] == ["step 1", "step 3"]
    assert api.commits[1][2] == {"config.json": "step 3"}
    assert api.repos == [("me/tiny", "model", True, True)]
    assert not any((tmp_path / "staging").iterdir())  # snapshots removed after upload


def test_hub_uploader_keeps_the_newest_per_branch(tmp_path):
    """The stock export goes to branch gpt2 (made once, mirrored exactly), beside the main branch's uploads."""
    release = threading.Event()
    api = FakeHfApi(block=release)
    uploader = HubUploader("me/tiny", tmp_path / "staging", api=api)
    for name in ("ours", "stock"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(name)
    uploader.submit(tmp_path / "ours", "step 1")  # uploading, blocked
    time.sleep(0.2)
    uploader.submit(tmp_path / "stock", "step 1", revision="gpt2")
    uploader.submit(tmp_path / "ours", "step 2")
    uploader.submit(tmp_path / "stock", "step 2", revision="gpt2")  # supersedes stock step 1
    release.set()
    assert uploader.close(timeout=10)
    sent = [(c[1], c[3], c[4], c[2]["config.json"]) for c in api.commits]
    assert sent == [("step 1", None, None, "ours"), ("step 2", None, None, "ours"), ("step 2", "gpt2", "*", "stock")]
    assert api.branches == [("me/tiny", "gpt2", True)]
    assert uploader.uploaded == ["step 1", "step 2", "step 2 (gpt2)"]


def test_check_access_creates_the_repo_and_its_gpt2_branch_or_says_why_not(tmp_path):
    from huggingface_hub.errors import LocalTokenNotFoundError

    from gpt2_repro.base.errors import HubAccessError

    api = FakeHfApi()
    api.whoami = lambda: {"name": "me"}
    uploader = HubUploader("me/tiny", tmp_path / "staging", private=True, api=api)
    uploader.check_access()
    assert api.repos == [("me/tiny", "model", True, True)]
    assert api.branches == [("me/tiny", "gpt2", True)]
    uploader.close()

    def no_token():
        raise LocalTokenNotFoundError("Token is required")

    api.whoami = no_token
    uploader = HubUploader("me/tiny", tmp_path / "staging", api=api)
    with pytest.raises(HubAccessError, match="no Hugging Face token found.*hf auth login"):
        uploader.check_access()
    uploader.close()


def test_hub_upload_failure_warns_without_the_token(tmp_path):
    token = "hf_" + "Sekr3tT0kenValue123456"
    api = FakeHfApi(fail_with=f"401 Unauthorized for token {token}")
    uploader = HubUploader("me/tiny", tmp_path / "staging", api=api)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="Hub upload of 'step 5' to me/tiny failed") as warned:
        uploader.submit(tmp_path / "export", "step 5")
        assert uploader.close(timeout=10)
    assert token not in str(warned[0].message) and "hf_***" in str(warned[0].message)
    assert token not in " ".join(uploader.errors) and uploader.uploaded == []
