"""A new user's first hour: the README's load snippet, the model cards' "Use" snippets and a freshly written export's
tokenizer, each in a real process whose stdin is not a terminal. transformers asks "Do you wish to run the custom
code? [y/N]" with input(): without a terminal the question is still printed (then read as no), so a prompt shows up
in the output here instead of waiting."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt2_repro.base.config import load_config
from synthetic import tiny_repro

ROOT = Path(__file__).resolve().parents[1]

# What a load must never print: transformers' remote-code question and what follows a "no" to it (the config read
# as a bare PreTrainedConfig, with its warning), and any warning or traceback at all on stderr.
PROMPT = ("Do you wish to run the custom code", "trust_remote_code", "hf.co/", "model of type")
ALARMING = (*PROMPT, "warn", "error", "traceback")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, gpt2_encoding):
    """A run folder as train.py leaves it: runs/tiny/export (our model, its code, tokenizer, card) and export-gpt2."""
    from gpt2_repro.checkpointing.checkpoints import save_model_files
    from gpt2_repro.data.tokenizer import build_hf_tokenizer

    home = tmp_path_factory.mktemp("first_hour")
    card = {"config": load_config(ROOT / "configs" / "tiny.yaml").to_dict(), "step": 4, "tokens": 4096}
    save_model_files(tiny_repro(), home / "runs" / "tiny" / "export", build_hf_tokenizer(gpt2_encoding), card)
    os.replace(home / "runs" / "tiny" / "export" / "export-gpt2", home / "runs" / "tiny" / "export-gpt2")
    return home


def _run(script: str, cwd: Path, project: bool = False) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter, stdin not a terminal; the project importable only when `project` is set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / ".hf_modules"))
    if project:
        env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_quiet(proc: subprocess.CompletedProcess) -> None:
    """It ran, asked nothing, and printed nothing alarming (stderr may hold transformers' loading progress bar)."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = [p for p in PROMPT if p in proc.stdout] + [a for a in ALARMING if a in proc.stderr.lower()]
    assert not found, f"printed {found}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


@pytest.mark.slow
def test_the_readme_snippet_as_written_loads_and_generates_without_a_question(run_folder):
    """README.md's first Python block, character for character, run where `runs/tiny/export` is the tiny run's."""
    snippet = _python_blocks((ROOT / "README.md").read_text())[0]
    assert 'AutoTokenizer.from_pretrained("runs/tiny/export"' in snippet  # the block this test is about
    proc = _run(snippet, run_folder)
    _assert_quiet(proc)
    assert proc.stdout.startswith("ROMEO:")


@pytest.mark.slow
@pytest.mark.parametrize("export", ["export", "export-gpt2"])
def test_each_model_cards_use_snippet_runs_without_a_question(run_folder, export):
    """The "Use" section of each export's card (a local card says path/to/this/folder: the folder itself here)."""
    folder = run_folder / "runs" / "tiny" / export
    [snippet] = _python_blocks((folder / "README.md").read_text())
    assert "path/to/this/folder" in snippet
    proc = _run(snippet.replace("path/to/this/folder", str(folder)), run_folder)
    _assert_quiet(proc)
    assert proc.stdout.startswith("Hello, I'm a language model,")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["trust_remote_code", "registered"])
def test_the_exported_tokenizer_loads_alone_without_a_question(run_folder, gpt2_encoding, how):
    """AutoTokenizer on the export, nothing else loaded: with trust_remote_code=True in any process, and without it
    in a process where the project registered its classes (gpt2_repro.register_auto_classes, as its scripts do).
    It gives tiktoken's ids and pads with end-of-text."""
    folder = run_folder / "runs" / "tiny" / "export"
    if how == "trust_remote_code":
        load = f"AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)"
    else:
        load = f"(register_auto_classes(), AutoTokenizer.from_pretrained({str(folder)!r}))[1]"
    script = textwrap.dedent(
        f"""
        from transformers import AutoTokenizer
        {"from gpt2_repro import register_auto_classes" if how == "registered" else ""}
        tok = {load}
        print(tok("ROMEO: What, ho!")["input_ids"], tok.pad_token)
        """
    )
    proc = _run(script, run_folder, project=how == "registered")
    _assert_quiet(proc)
    assert proc.stdout.split() == [*str(gpt2_encoding.encode("ROMEO: What, ho!")).split(), "<|endoftext|>"]
