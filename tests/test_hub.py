"""publishing/hub.py: the background uploader and start-up check (a fake HfApi stands in for the network)."""

import inspect
import shutil
import threading
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from gpt2_repro.publishing.hub import HubUploader


def bound(name: str, *args, **kwargs) -> dict:
    """The arguments of a call to HfApi.`name`, bound to the real method's signature: a keyword it does not take, or
    a positional argument where it takes keywords only, fails here as it would against the Hub."""
    arguments = inspect.signature(getattr(HfApi, name)).bind(None, *args, **kwargs).arguments
    return {k: v for k, v in arguments.items() if k != "self"}


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi at the network boundary: records what would be sent. `block`: uploads
    wait for it (`started` is set once the first one does, `in_flight` counts those under way)."""

    def __init__(self, block: threading.Event | None = None, fail_with: str | None = None):
        self.block, self.fail_with = block, fail_with
        self.started, self.in_flight = threading.Event(), 0
        self.repos, self.branches, self.commits = [], [], []

    def whoami(self, *args, **kwargs):
        bound("whoami", *args, **kwargs)
        return {"name": "me"}

    def create_repo(self, *args, **kwargs):
        a = bound("create_repo", *args, **kwargs)
        self.repos.append((a["repo_id"], a.get("repo_type"), a.get("private"), a.get("exist_ok", False)))

    def create_branch(self, *args, **kwargs):
        a = bound("create_branch", *args, **kwargs)
        self.branches.append((a["repo_id"], a["branch"], a.get("exist_ok", False)))

    def upload_folder(self, *args, **kwargs):
        a = bound("upload_folder", *args, **kwargs)
        self.in_flight += 1
        self.started.set()
        if self.block is not None:
            self.block.wait(30)
        try:
            if self.fail_with:
                raise RuntimeError(self.fail_with)
            files = {p.name: p.read_text() for p in Path(a["folder_path"]).iterdir()}
            commit = (a["repo_id"], a.get("commit_message"), files, a.get("revision"), a.get("delete_patterns"))
            self.commits.append(commit)
        finally:
            self.in_flight -= 1


def test_the_fake_takes_only_what_hfapi_takes():
    """The stand-in is bound to the real signatures: a misspelt or unknown keyword fails."""
    api = FakeHfApi()
    with pytest.raises(TypeError, match="unexpected keyword argument 'privat'"):
        api.create_repo("me/tiny", privat=True)
    with pytest.raises(TypeError, match="too many positional arguments"):
        api.upload_folder("me/tiny", "folder")  # HfApi.upload_folder takes keywords only


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
    uploader.submit(exports[0], "step 1")  # starts uploading, blocked in the fake network
    assert api.started.wait(10)
    uploader.submit(exports[1], "step 2")  # waits...
    uploader.submit(exports[2], "step 3")  # ...and is superseded by this one
    assert api.in_flight == 1 and not release.is_set()  # submitting returned while the network held step 1
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
    assert api.started.wait(10)
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
