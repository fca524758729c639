"""hub.py: the background uploader (a fake HfApi stands in for the network) and the model cards."""

import shutil
import threading
import time
from pathlib import Path

import pytest

from hub import HubUploader


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi at the network boundary: records what would be sent."""

    def __init__(self, block: threading.Event | None = None, fail_with: str | None = None):
        self.block, self.fail_with = block, fail_with
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        self.repos.append((repo_id, repo_type, private, exist_ok))

    def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
        if self.block is not None:
            self.block.wait(10)
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        files = {p.name: p.read_text() for p in Path(folder_path).iterdir()}
        self.commits.append((repo_id, commit_message, files))


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
    shutil.rmtree(
        exports[2]
    )  # rotation deletes checkpoints: the snapshot taken at submit is what goes up
    release.set()
    assert uploader.close(timeout=10)
    assert [c[1] for c in api.commits] == ["step 1", "step 3"]
    assert api.commits[1][2] == {"config.json": "step 3"}
    assert api.repos == [("me/tiny", "model", True, True)]
    assert not any((tmp_path / "staging").iterdir())  # snapshots removed after upload


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


def test_model_card_states_the_run_and_the_reference_figures(tmp_path):
    from huggingface_hub import ModelCard

    from hub import GPT2_124M, write_model_card
    from train_config import TrainConfig

    config = TrainConfig().to_dict()
    path = write_model_card(
        tmp_path,
        step=500,
        tokens=500 * 524288,
        config=config,
        val_loss=3.5,
        val_step=500,
        data_source="HuggingFaceFW/fineweb-edu (sample-10BT)",
        where="me/gpt2-repro",
    )
    card = ModelCard.load(path)
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"] and "custom_code" in card.data.tags
    assert (
        "step 500" in card.text
        and "3.5000" in card.text
        and f"{GPT2_124M['val_loss']}" in card.text
    )
    assert 'from_pretrained("me/gpt2-repro", trust_remote_code=True)' in card.text
    assert "12 layers" in card.text and "context 1024" in card.text
