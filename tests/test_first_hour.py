"""A new user's first hour, in real processes: the README's load snippet and sample command, the model cards' "Use"
snippets and a freshly written export's tokenizer, whose stdin is not a terminal (transformers asks "Do you wish to run
the custom code? [y/N]" with input(): without a terminal the question is still printed, then read as no, so a prompt
shows up in the output here instead of waiting); what a training run prints before and during its steps, into a file
and in a real terminal (a pseudo-terminal) under README's `accelerate launch`."""

import os
import re
import subprocess
import sys
import textwrap
import time
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


# ------------------------------------------------------------------------------------------------ sample.py


def _readme_command(program: str) -> str:
    """The line of README's "Try it" block that runs `program`."""
    block = re.search(r"## Try it.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    [line] = [line for line in block.splitlines() if line.startswith(f"python {program} ")]
    return line


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A README command line as a shell runs it, in `cwd`, with the project installed (what `pip install -e .` gives)
    and no terminal to answer a question."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / ".hf_modules"), PYTHONPATH=str(ROOT))
    assert command.startswith("python ")
    command = f"{sys.executable} {command.removeprefix('python ')}"
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_readmes_sample_command_as_written_prints_a_seeded_sample(run_folder, capsys):
    """`python sample.py --model runs/tiny --prompt "ROMEO:"` from README, where runs/tiny is a run folder (its
    export/ is read): the prompt and its continuation, nothing else. The same seed gives the same text in another
    process (the first of two samples here), the next sample another text; greedy sampling gives one text; more
    tokens than the context holds are refused."""
    from gpt2_repro.base.errors import ConfigError
    from sample import main

    command = _readme_command("sample.py")
    assert "--model runs/tiny " in command and '--prompt "ROMEO:"' in command
    (run_folder / "sample.py").unlink(missing_ok=True)
    (run_folder / "sample.py").symlink_to(ROOT / "sample.py")  # the clone's root, where README's commands run
    proc = _shell(command, run_folder)
    _assert_quiet(proc)
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout) > len("ROMEO:\n"), proc.stdout
    model = str(run_folder / "runs" / "tiny")
    first, second = main(["--model", model, "--prompt", "ROMEO:", "--num_samples", "2"])
    assert proc.stdout == f"ROMEO:{first}\n" and second != first
    assert capsys.readouterr().out.startswith("--- sample 1 of 2\nROMEO:")
    one, two = main(["--model", model, "--temperature", "0", "--num_samples", "2", "--sample_tokens", "12"])
    assert one == two and len(one) > 0
    with pytest.raises(ConfigError, match=r"exceed the model's context of 128 tokens: lower --sample_tokens to 119"):
        main(["--model", model, "--sample_tokens", "500"])


def test_the_streamer_prints_each_character_as_soon_as_its_bytes_are_complete(gpt2_encoding):
    """A character whose UTF-8 bytes span several GPT-2 tokens is printed once all of them came, not as U+FFFD;
    end-of-text ends the text unprinted."""
    import io

    import torch

    from gpt2_repro.evaluation.sampling import TokenStreamer

    ids = gpt2_encoding.encode(" a 🦙 b")
    pieces = [gpt2_encoding.decode_single_token_bytes(t) for t in ids]
    assert any(len(p) and p.decode("utf-8", errors="ignore") == "" for p in pieces)  # a token that is half a character
    out = io.StringIO()
    streamer = TokenStreamer(gpt2_encoding, out)
    streamer.put(torch.tensor([[50256, 1, 2]]))  # the prompt: not printed again
    shown = []
    for t in ids:
        streamer.put(torch.tensor([t]))
        shown.append(out.getvalue())
    streamer.put(torch.tensor([50256]))
    streamer.end()
    assert out.getvalue() == " a 🦙 b\n" == streamer.text + "\n"
    assert "\ufffd" not in "".join(shown) and " a 🦙" in shown[-2]  # each step shows whole characters only


def test_a_run_folder_means_its_export(tmp_path):
    from gpt2_repro.base.errors import NotFound
    from gpt2_repro.evaluation.sampling import model_location

    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(NotFound, match="without a model yet"):
        model_location(str(run))
    (run / "export").mkdir()
    (run / "export" / "config.json").write_text("{}")
    assert model_location(str(run)) == str(run / "export")
    assert model_location(str(run / "export")) == str(run / "export")  # a model folder is itself
    assert model_location("gpt2") == "gpt2"  # a Hub id
    with pytest.raises(NotFound, match="holds no model"):
        model_location(str(tmp_path))


# ------------------------------------------------------------------------------- what a training run prints

SUMMARY = ("model: GPT-2 of ", "batch: ", "data: ", "run folder: ")


def _start(output: str, first_step: str) -> list[str]:
    """The lines a run printed before it showed its first step (`first_step`: how that begins)."""
    return [line.strip() for line in output[: output.index(first_step)].splitlines() if line.strip()]


def _assert_short_start(start: list[str], run: Path) -> None:
    """A few lines that matter before step 1 (the model, the batch, the data, the run folder), no config dump: that
    is in the files the run folder line names."""
    assert len(start) <= 8, "\n".join(start)
    for prefix in SUMMARY:
        assert sum(line.startswith(prefix) for line in start) >= 1, (prefix, start)
    text = "\n".join(start)
    assert "n_layer:" not in text and '"versions"' not in text, text  # the config and run info stay in their files
    assert "config.yaml" in text and "run_info.json" in text and str(run) in text
    assert "n_layer: 2" in (run / "config.yaml").read_text() and "versions" in (run / "run_info.json").read_text()


@pytest.mark.slow
def test_output_to_a_file_is_plain_lines(reference):
    """The reference run's output went to pipes, as to a file under nohup or Slurm: no bar, no carriage return;
    the first and last steps as lines of their own, the evaluations on lines of their own."""
    run, output = reference
    assert "\r" not in output.stdout + output.stderr and "it/s" not in output.stdout + output.stderr
    lines = output.stdout.splitlines()
    _assert_short_start(_start(output.stdout, "step 1/16: "), run)
    steps = [int(m.group(1)) for m in (re.match(r"step (\d+)/16: loss \d", line) for line in lines) if m]
    assert steps[0] == 1 and steps[-1] == 16 and steps == sorted(set(steps)), steps
    assert all(
        re.search(r"\| \d\d:\d\d elapsed, \d\d:\d\d left$", line) for line in lines if line.startswith("step 1/")
    )
    for step in (4, 8, 12, 16):
        assert sum(line.startswith(f"step {step}: val_loss ") for line in lines) == 1, step
    assert max(map(len, lines)) < 300


def _in_a_terminal(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    """(exit code, what the terminal showed) of `cmd` run with stdin, stdout and stderr on a pseudo-terminal."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows, 160 columns, as a window has
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    shown, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the terminal's other end closed: the process and its children are gone
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(main)
    return proc.returncode, shown.decode(errors="replace")


@pytest.mark.slow
def test_the_laptop_preset_in_a_terminal_on_a_small_text_file(tmp_path, gpt2_encoding):
    """`accelerate launch --config_file accelerate_single.yaml train.py --config configs/tiny.yaml --dataset my.txt`
    in a real terminal. accelerate's "values not passed" warning is gone; a few lines come before the bar, and the bar
    is drawn. With no preparation step, the preset's validation set is the one its data_prep.py command makes
    (32,768 tokens + 1), not data_prep.py's FineWeb-sized default, so a small file trains."""
    from runs import TINY_ARGS
    from synthetic import make_texts

    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(make_texts(300, seed=3)))
    assert 40_000 < len(gpt2_encoding.encode(text.read_text(), allowed_special="all")) < 200_000  # a small file
    accelerate = Path(sys.executable).with_name("accelerate")  # the command README names, where pip put it
    launch = (
        [str(accelerate), "launch"] if accelerate.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
    )
    run = tmp_path / "run"
    args = ["--dataset", str(text), "--hellaswag", "false", "--max_steps", "3", "--num_samples", "0"]
    args += ["--eval_every", "0", "--checkpoint_every", "0", "--output_dir", str(run)]
    config = ["--config_file", str(ROOT / "accelerate_single.yaml")]
    code, shown = _in_a_terminal([*launch, *config, str(ROOT / "train.py"), *TINY_ARGS, *args])
    assert code == 0, shown[-3000:]
    assert "were not passed" not in shown and "warn" not in shown.lower(), shown[:3000]
    start = _start(shown, "train: ")
    _assert_short_start(start, run)
    assert f"data: {text}, tokenized as it streams; its first 32,769 tokens are the validation set" in "\n".join(start)
    assert re.search(r"train: +\d+%.*\| 3/3 .*loss \d+\.\d{4}", shown), shown[-2000:]  # tqdm's bar, redrawn
    assert "step 3: val_loss" in shown
