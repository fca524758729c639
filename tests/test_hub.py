"""hub.py: the background uploader and start-up check (a fake HfApi stands in for the network), the model cards."""

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
        self.repos, self.branches, self.commits = [], [], []

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        self.repos.append((repo_id, repo_type, private, exist_ok))

    def create_branch(self, repo_id, branch, repo_type=None, exist_ok=False):
        self.branches.append((repo_id, branch, exist_ok))

    def upload_folder(
        self, repo_id, repo_type, folder_path, commit_message, revision=None, delete_patterns=None
    ):
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
    shutil.rmtree(
        exports[2]
    )  # rotation deletes checkpoints: the snapshot taken at submit is what goes up
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
    assert sent == [
        ("step 1", None, None, "ours"),
        ("step 2", None, None, "ours"),
        ("step 2", "gpt2", "*", "stock"),
    ]
    assert api.branches == [("me/tiny", "gpt2", True)]
    assert uploader.uploaded == ["step 1", "step 2", "step 2 (gpt2)"]


def test_check_access_creates_the_repo_and_its_gpt2_branch_or_says_why_not(tmp_path):
    from huggingface_hub.errors import LocalTokenNotFoundError

    from hub import HubAccessError

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


def test_model_card_states_the_run_and_the_reference_figures(tmp_path):
    from huggingface_hub import ModelCard

    from hub import GPT2_124M, write_model_card
    from train_config import TrainConfig

    config = TrainConfig().to_dict()
    source = {"dataset": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"}
    path = write_model_card(
        tmp_path,
        step=500,
        tokens=500 * 524288,
        config=config,
        val_loss=3.5,
        val_step=500,
        hellaswag_acc_norm=0.2512,
        hellaswag_examples=10042,
        data_source=source,
        repo_id="me/gpt2-repro",
    )
    card = ModelCard.load(path)
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"] and "custom_code" in card.data.tags
    assert (
        "step 500" in card.text
        and "3.5000" in card.text
        and f"{GPT2_124M['val_loss']}" in card.text
    )
    assert 'from_pretrained("me/gpt2-repro", trust_remote_code=True)' in card.text
    assert 'from_pretrained("me/gpt2-repro", revision="gpt2")' in card.text  # the stock variant
    assert "12 layers" in card.text and "context 1024" in card.text
    results = {(r.dataset_type, r.metric_type): r for r in card.data.eval_results}
    loss = results[("HuggingFaceFW/fineweb-edu", "loss")]
    assert loss.metric_value == 3.5 and loss.dataset_config == "sample-10BT"
    hellaswag = results[("Rowan/hellaswag", "acc_norm")]
    assert hellaswag.metric_value == 0.2512 and hellaswag.dataset_split == "validation"


def test_model_card_of_local_data_names_no_local_path(tmp_path):
    """A card is meant to be shared: local data by its file name only, no run folder, a subset labelled."""
    from huggingface_hub import ModelCard

    from hub import write_model_card
    from train_config import TrainConfig

    config = TrainConfig().to_dict()
    config["data"]["data_dir"] = str(tmp_path / "private" / "shards")
    data_file = tmp_path / "private" / "corpus.txt"
    source = {"dataset": str(data_file), "builder": "text", "data_files": [str(data_file)]}
    path = write_model_card(
        tmp_path,
        step=16,
        tokens=4096,
        config=config,
        val_loss=6.25,
        hellaswag_acc_norm=0.3,
        hellaswag_examples=100,
        data_source=source,
        stock_gpt2=True,
    )
    text = path.read_text()
    assert str(tmp_path) not in text and "private" not in text
    card = ModelCard.load(path)
    assert card.data.datasets is None and "custom_code" not in card.data.tags
    assert "local text (`corpus.txt`)" in card.text
    assert 'from_pretrained("path/to/this/folder")' in card.text
    splits = {r.metric_type: r.dataset_split for r in card.data.eval_results}
    assert splits == {
        "loss": "validation (first 10,485,760 tokens, held out)",
        "acc_norm": "validation[:100]",
    }
    assert "HellaSwag acc_norm (100 of 10,042 examples)" in card.text


def test_update_model_card_replaces_the_trainers_results_and_keeps_the_rest(tmp_path):
    from huggingface_hub import ModelCard

    from hub import update_model_card, write_model_card
    from train_config import TrainConfig

    source = {"dataset": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"}
    write_model_card(
        tmp_path,
        step=8,
        tokens=1,
        config=TrainConfig().to_dict(),
        val_loss=4.0,
        hellaswag_acc_norm=0.25,
        hellaswag_examples=50,
        data_source=source,
    )
    val = {"value": 3.9, "tokens": 1024, "data_source": source}
    update_model_card(
        tmp_path, "## Evaluation results\nmeasured", {"acc_norm": 0.28, "acc": 0.27}, val
    )
    card = ModelCard.load(tmp_path / "README.md")
    got = {
        (r.dataset_type, r.metric_type): (r.metric_value, r.dataset_split)
        for r in card.data.eval_results
    }
    assert got == {
        ("HuggingFaceFW/fineweb-edu", "loss"): (3.9, "validation (first 1,024 tokens, held out)"),
        ("Rowan/hellaswag", "acc_norm"): (0.28, "validation"),
        ("Rowan/hellaswag", "acc"): (0.27, "validation"),
    }
    assert "# GPT-2 reproduction, step 8" in card.text and "measured" in card.text
