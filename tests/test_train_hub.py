"""train.py --push_to_hub: uploads in the background, refusals at start (a fake HfApi at the network boundary; the rest
is the real code)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runs import ROOT, TINY_ARGS, assert_refused_at_start, run_env

FAKE_HUB_RUNNER = """
import inspect, json, os, runpy, sys
from pathlib import Path

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from gpt2_repro.publishing import hub as hub

calls = []


def bound(name, *args, **kwargs):
    # The call bound to the real HfApi method's signature: an argument it does not take fails as against the Hub.
    arguments = inspect.signature(getattr(HfApi, name)).bind(None, *args, **kwargs).arguments
    return {k: v for k, v in arguments.items() if k != "self"}


class FakeHfApi:
    def whoami(self, *args, **kwargs):
        calls.append(["whoami", bound("whoami", *args, **kwargs)])
        return {"name": "me"}

    def create_repo(self, *args, **kwargs):
        kw = bound("create_repo", *args, **kwargs)
        repo_id = kw.pop("repo_id")
        calls.append(["create_repo", repo_id, kw])
        if os.environ.get("FAKE_HUB_DENY"):
            request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
            response = httpx2.Response(403, request=request)
            raise HfHubHTTPError("403 Forbidden: no write access to " + repo_id, response=response)

    def create_branch(self, *args, **kwargs):
        kw = bound("create_branch", *args, **kwargs)
        calls.append(["create_branch", kw.pop("repo_id"), kw])

    def upload_folder(self, *args, **kwargs):
        kw = bound("upload_folder", *args, **kwargs)
        repo_id, folder_path, commit_message = kw.pop("repo_id"), kw.pop("folder_path"), kw.pop("commit_message")
        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = (Path(folder_path) / "README.md").read_text()
        calls.append(["upload_folder", repo_id, commit_message, kw, files, card])


if os.environ.get("FAKE_HUB", "1") == "1":
    hub.HfApi = FakeHfApi
sys.argv = [os.environ["TRAIN_PY"], *sys.argv[1:]]
try:
    runpy.run_path(os.environ["TRAIN_PY"], run_name="__main__")
finally:
    Path(os.environ["FAKE_HUB_RECORD"]).write_text(json.dumps(calls))
"""


def _train_with_fake_hub(args: list[str], tmp_path: Path, **env):
    runner = tmp_path / "run_with_fake_hub.py"
    runner.write_text(FAKE_HUB_RUNNER)
    record = tmp_path / "hub_calls.json"
    env = run_env(PYTHONPATH=str(ROOT), TRAIN_PY=str(ROOT / "train.py"), FAKE_HUB_RECORD=str(record), **env)
    proc = subprocess.run(
        [sys.executable, str(runner), *TINY_ARGS, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, json.loads(record.read_text()) if record.is_file() else None


@pytest.mark.slow
def test_push_to_hub_uploads_both_exports_in_the_background(data_dir, tmp_path):
    """Login and repo checked at start-up; each checkpoint's export goes to main, the stock one to branch gpt2."""
    token = "hf_" + "NeverPrintMe0123456789"
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--output_dir", str(out), "--max_steps", "4"]
    args += ["--checkpoint_every", "2", "--hellaswag", "false"]
    args += ["--push_to_hub", "me/gpt2-tiny", "--hub_private", "true"]
    proc, calls = _train_with_fake_hub(args, tmp_path, HF_TOKEN=token)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert token not in proc.stdout + proc.stderr
    assert calls[:3] == [  # before any training
        ["whoami", {}],
        ["create_repo", "me/gpt2-tiny", {"repo_type": "model", "private": True, "exist_ok": True}],
        ["create_branch", "me/gpt2-tiny", {"branch": "gpt2", "repo_type": "model", "exist_ok": True}],
    ]
    uploads = [c for c in calls if c[0] == "upload_folder"]
    main = [c for c in uploads if c[3]["revision"] is None]
    stock = [c for c in uploads if c[3]["revision"] == "gpt2"]
    assert main[-1][2] == stock[-1][2] == "step 4"  # the final exports always go up
    for upload in (main[-1], stock[-1]):  # once the evaluation of step 4, after the checkpoint, is in its cards
        assert "## Evaluation during training\n\nMeasured by the trainer at step 4." in upload[-1], upload[-1]
        row = next(line for line in upload[-1].splitlines() if line.startswith("| validation loss"))
        assert float(row.split("|")[2]) > 0, row
    for _, _, _, kw, files, card in main:
        assert {"config.json", "model.safetensors", "modeling_gpt2_repro.py"} <= set(files)
        assert {"README.md", "tokenizer.json", "generation_config.json"} <= set(files)
        assert not {"optimizer.bin", "trainer_state.json"} & set(files) and "delete_patterns" not in kw
        assert 'from_pretrained("me/gpt2-tiny", trust_remote_code=True)' in card
        assert 'revision="gpt2"' in card  # the card points to the stock variant
    for _, _, _, kw, files, card in stock:
        assert "modeling_gpt2_repro.py" not in files and "model.safetensors" in files
        assert kw["delete_patterns"] == "*"  # the branch mirrors the stock export exactly
        assert 'from_pretrained("me/gpt2-tiny", revision="gpt2")' in card
    for *_, card in uploads:  # nothing local in what is published
        assert str(tmp_path) not in card and str(data_dir) not in card and str(ROOT) not in card
    assert not list((out / ".hub-staging").iterdir())


@pytest.mark.slow
def test_push_to_hub_without_a_token_fails_before_training(data_dir, tmp_path):
    """The real HfApi, with no token anywhere: it answers before any request (offline is fine)."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--output_dir", str(out), "--push_to_hub", "me/x"]
    env = {"FAKE_HUB": "0", "HF_HOME": str(tmp_path / "hf-home")}
    proc, calls = _train_with_fake_hub(args, tmp_path, **env)
    assert_refused_at_start(proc, out, "no Hugging Face token found. Log in with `hf auth login`")


@pytest.mark.slow
def test_push_to_hub_without_write_access_fails_before_training(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--output_dir", str(out), "--push_to_hub", "openai/gpt2"]
    proc, calls = _train_with_fake_hub(args, tmp_path, HF_TOKEN="hf_" + "x" * 20, FAKE_HUB_DENY="1")
    assert_refused_at_start(proc, out, "403 Forbidden")
    assert [c[0] for c in calls] == ["whoami", "create_repo"]
