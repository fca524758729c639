"""evaluate_gpt2.py: the command line end to end, in subprocesses: results, offline fallbacks, two processes,
input errors."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from gpt2_repro.evaluation.scoring import score_hellaswag, validation_loss
from gpt2_repro.publishing.cards import CARD_START
from runs import MAX_STEPS, read_metrics
from synthetic import SEQ_LEN, VAL_WINDOWS, tiny_repro, write_jsonl
from synthetic import hellaswag_examples as make_examples

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    cmd = [sys.executable, str(ROOT / "evaluate_gpt2.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def saved(tmp_path_factory, repro):
    """A run folder as the trainer leaves it: export/ (our model + model card), export-gpt2/, metrics.jsonl."""
    run = tmp_path_factory.mktemp("run")
    repro.save_pretrained(run / "export")
    (run / "export" / "README.md").write_text("---\nlicense: mit\n---\n# tiny run\n\nNotes that must survive.\n")
    repro.to_official_gpt2().save_pretrained(run / "export-gpt2")
    lines = [{"step": s, "loss": 11 - s / 10} for s in range(0, 40, 5)]
    lines += [{"step": s, "val_loss": 10.9 - s / 20, "hellaswag_acc_norm": 0.24 + s / 1000} for s in (0, 20, 40)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


@pytest.mark.slow
def test_cli_end_to_end(saved, val_dir, gpt2_encoding, repro, tmp_path):
    examples = make_examples(9, seed=7)
    hs = write_jsonl(tmp_path / "hellaswag_val.jsonl", examples)
    out = tmp_path / "out" / "results.json"
    proc = run_cli(
        "--model",
        saved / "export",
        "--data_dir",
        val_dir,
        "--val_tokens",
        SEQ_LEN * VAL_WINDOWS,
        "--seq_len",
        SEQ_LEN,
        "--hellaswag_file",
        hs,
        "--hellaswag_limit",
        7,
        "--batch_size",
        3,
        "--device",
        "cpu",
        "--compare",
        saved / "export-gpt2",
        "--output",
        out,
    )
    results = json.loads(out.read_text())
    want_hs = score_hellaswag(repro, gpt2_encoding, examples[:7])
    want_val = validation_loss(repro, val_dir, SEQ_LEN * VAL_WINDOWS, 8, SEQ_LEN)
    assert results["val_loss"] == pytest.approx(want_val, rel=1e-6) and results["seq_len"] == SEQ_LEN
    assert results["hellaswag_examples"] == 7
    assert (results["hellaswag_acc"], results["hellaswag_acc_norm"]) == (want_hs["acc"], want_hs["acc_norm"])
    cmp = results["compare"]  # the stock export, evaluated on the same data: the same numbers
    assert cmp["evaluated"] and cmp["val_loss"] == pytest.approx(want_val, rel=1e-6)
    assert cmp["hellaswag_acc_norm"] == want_hs["acc_norm"]
    assert "| `export-gpt2`, evaluated here on the same data |" in proc.stdout  # by name, as in the JSON and card
    assert "| OpenAI GPT-2 124M, published | 3.2924 | 10,485,760 of FineWeb-Edu sample-10BT | 0.2955 |" in proc.stdout
    assert "| OpenAI GPT-3 124M, published | - | - | 0.3370 |" in proc.stdout
    assert f"| this model (`export`) | {want_val:.4f} | {SEQ_LEN * VAL_WINDOWS:,} |" in proc.stdout  # its token count
    png = out.with_suffix(".png")  # the run's metrics.jsonl, found two levels up from the model folder
    assert results["plot"] == png.name and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["model"] == "export" and str(tmp_path) not in out.read_text()  # no path of this machine
    card = (saved / "export" / "README.md").read_text()
    assert "Notes that must survive." in card and CARD_START in card and f"{want_hs['acc_norm']:.4f}" in card
    assert str(saved) not in card and "| this model (`export`) |" in card  # no local path
    assert "| `export-gpt2`, evaluated here on the same data |" in card
    # model-index: HellaSwag only when all of it was scored (here 7 examples), and the validation loss only on a Hub
    # dataset (here shards of local data, named in the text): the metadata's dataset type is always a Hub id
    assert ModelCard(card).data.eval_results is None and f"| {want_val:.4f} |" in card


@pytest.mark.slow
def test_cli_offline_without_hellaswag_warns_and_falls_back(saved, val_dir, tmp_path):
    """No HellaSwag file, no network, `--compare gpt2` not in the cache: a warning each, no crash; the validation
    loss is the stock export's over the model's whole context (no --seq_len)."""
    from transformers import GPT2LMHeadModel

    out = tmp_path / "results.json"
    proc = run_cli(
        "--model",
        saved / "export-gpt2",
        "--data_dir",
        val_dir,
        "--val_tokens",
        SEQ_LEN * 2,
        "--device",
        "cpu",
        "--compare",
        "gpt2",
        "--output",
        out,
        "--model_card",
        "false",
        GPT2_REPRO_CACHE=tmp_path / "cache",
        GPT2_REPRO_HELLASWAG_URL="http://127.0.0.1:9/hellaswag_val.jsonl",
        HF_HOME=tmp_path / "hf",
    )
    assert "HellaSwag skipped" in proc.stderr and "--hellaswag_file" in proc.stderr
    results = json.loads(out.read_text())
    stock = GPT2LMHeadModel.from_pretrained(saved / "export-gpt2", dtype=torch.float32)
    want_val = validation_loss(stock, val_dir, SEQ_LEN * 2, 8, results["seq_len"])
    assert results["val_loss"] == pytest.approx(want_val, rel=1e-6) and results["seq_len"] == 128  # its context
    assert results["hellaswag_acc"] is None and results["hellaswag_examples"] == 0
    assert results["compare"]["evaluated"] is False and results["compare"]["val_loss"] == 3.2924
    assert "`gpt2` could not be loaded here" in proc.stdout and "evaluated here" not in proc.stdout
    # why, in general terms: transformers' own text about this machine's connection stays in the warning
    assert results["compare"]["reason"] == "not in the local cache, and the Hub could not be reached"
    assert "couldn't connect" in proc.stderr and "couldn't connect" not in out.read_text() + proc.stdout
    assert "--val_tokens" not in proc.stderr  # given: no default to explain
    assert not (saved / "export-gpt2" / "README.md").exists()


@pytest.mark.slow
def test_a_runs_export_is_evaluated_on_the_tokens_the_run_evaluated(reference, tmp_path):
    """Neither --data_dir nor --val_tokens: evaluate_gpt2.py on a run's export scores what the trainer scored (the
    run's data, budget and windows, read from its newest checkpoint's run state), says so, and gets the trainer's
    figure; the card says both figures are over the same tokens. On another budget it says why they differ. What
    is published (the JSON, the card) names no path of this machine and no exception text."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run, symlinks=True)
    _, evals = read_metrics(run)
    env = {"GPT2_REPRO_CACHE": tmp_path / "cache", "HF_HOME": tmp_path / "hf"}
    env["GPT2_REPRO_HELLASWAG_URL"] = "http://127.0.0.1:9/hellaswag_val.jsonl"  # offline: skipped with a warning
    proc = run_cli("--model", run / "export", "--device", "cpu", "--compare", "gpt2", **env)
    assert "--data_dir unset: the training run's data" in proc.stderr
    assert "--val_tokens unset: the 512 tokens the training run evaluated, in windows of 32" in proc.stderr
    results = json.loads((run / "export" / "eval_results.json").read_text())
    assert (results["val_tokens"], results["seq_len"]) == (512, 32) and results["run_eval"]["same_tokens"]
    assert results["val_loss"] == pytest.approx(evals[MAX_STEPS]["val_loss"], rel=1e-6)
    card = (run / "export" / "README.md").read_text()
    trainer_row = (
        f"| validation loss (first 512 tokens of the validation split, windows of 32) | {results['val_loss']:.4f}"
    )
    assert trainer_row in card and f"| this model (`export`) | {results['val_loss']:.4f} | 512 |" in card
    assert f"These are the tokens the training run evaluated: its own figure was {evals[16]['val_loss']:.4f}" in card
    assert card.index("## Evaluation during training") < card.index("## Evaluation results") < card.index("## Use")
    published = card + (run / "export" / "eval_results.json").read_text()
    assert str(tmp_path) not in published and "couldn't connect" not in published
    assert "not in the local cache, and the Hub could not be reached" in card
    # Another budget on the same data: the difference from the trainer's figure is explained, not left to puzzle.
    checkpoint = run / "checkpoints" / "step_00000012"
    proc = run_cli(
        "--model", checkpoint, "--device", "cpu", "--val_tokens", 256, "--output", tmp_path / "r.json", **env
    )
    results = json.loads((tmp_path / "r.json").read_text())
    assert (results["val_tokens"], results["run_eval"]["same_tokens"]) == (256, False)
    assert (
        "The training run evaluated other tokens (the first 512 of its validation data, windows of 32): its "
        in (checkpoint / "README.md").read_text()
    )
    assert f"{evals[12]['val_loss']:.4f} at step 12 averages over other text" in (checkpoint / "README.md").read_text()


@pytest.mark.slow
def test_two_processes_equal_one(saved, val_dir, tmp_path):
    """torchrun with 2 CPU processes: disjoint slices, uneven (4 + 3 examples, 3 + 2 windows), gathered exactly."""
    hs = write_jsonl(tmp_path / "hs.jsonl", make_examples(7, seed=8))
    common = [
        "--model",
        saved / "export",
        "--data_dir",
        val_dir,
        "--val_tokens",
        SEQ_LEN * VAL_WINDOWS,
        "--seq_len",
        SEQ_LEN,
        "--hellaswag_file",
        hs,
        "--batch_size",
        2,
        "--device",
        "cpu",
        "--model_card",
        "false",
    ]
    run_cli(*common, "--output", tmp_path / "one.json")
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own: no clash with another test or user of the machine
        "--nproc_per_node",
        "2",
        str(ROOT / "evaluate_gpt2.py"),
        *map(str, common),
        "--output",
        str(tmp_path / "two.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    for key in ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_examples"):
        assert two[key] == one[key]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "no_model",
        "bad_hellaswag",
        "seq_len",
        "nan_weights",
        "truncated_weights",
        "no_config",
        "latin1_hellaswag",
        "missing_hellaswag",
        "readonly_output",
        "more_layers",
        "pickle",
    ],
)
def test_cli_input_errors_exit_2_with_one_line(case, saved, val_dir, tmp_path, request):
    """Input errors end with one `error:` line naming the problem and the fix, exit code 2, no traceback, nothing
    written; all but what only loading the model finds (non-finite weights, weights that do not fit the config,
    a weights file that is a pickle of something else) before torch is imported (python -X importtime)."""
    loaded = ("nan_weights", "more_layers", "pickle")
    args = ["--model", saved / "export", "--device", "cpu", "--output", tmp_path / "r.json"]
    if case == "no_model":
        args[1], expected = tmp_path / "nowhere", "Could not load a causal LM from"
    elif case == "bad_hellaswag":
        bad = tmp_path / "hs.jsonl"
        bad.write_text('{"ctx": "A man", "endings": ["a", "b"], "label": 0}\n')
        args += ["--hellaswag_file", bad]
        expected = "hs.jsonl:1: endings must be a list of 4 strings"
    elif case == "seq_len":
        args += ["--data_dir", val_dir, "--seq_len", 4096]
        expected = "seq_len=4096 is longer than the model's context (128)"
    elif case == "nan_weights":
        broken = tiny_repro()
        with torch.no_grad():
            broken.lm_head.weight[7, 3] = float("nan")  # tied: the embedding too
        broken.save_pretrained(tmp_path / "diverged")
        args[1], expected = tmp_path / "diverged", "weight tensor(s) hold NaN or inf"
    elif case == "truncated_weights":
        shutil.copytree(saved / "export", tmp_path / "copy")
        weights = tmp_path / "copy" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        args[1], expected = tmp_path / "copy", "its weights cannot be read (Error while deserializing header"
    elif case == "no_config":
        shutil.copytree(saved / "export", tmp_path / "copy")
        (tmp_path / "copy" / "config.json").unlink()
        args[1], expected = tmp_path / "copy", "no config.json there, so it is not a model folder"
    elif case == "latin1_hellaswag":
        latin1 = tmp_path / "hs.jsonl"
        latin1.write_bytes('{"ctx": "caf\xe9", "endings": ["a", "b", "c", "d"], "label": 0}\n'.encode("latin-1"))
        args += ["--hellaswag_file", latin1]
        expected = "hs.jsonl:1: not UTF-8 text (byte 0xe9 at column 13)"
    elif case == "missing_hellaswag":
        args += ["--hellaswag_file", tmp_path / "typo.jsonl"]
        expected = f"--hellaswag_file {tmp_path / 'typo.jsonl'}: no such file"
    elif case == "more_layers":  # config.json edited, n_layer 2 -> 3: a block at random (test_scoring: 2 -> 1)
        shutil.copytree(saved / "export", tmp_path / "copy")
        config = json.loads((tmp_path / "copy" / "config.json").read_text())
        (tmp_path / "copy" / "config.json").write_text(json.dumps(config | {"n_layer": 3}))
        args[1] = tmp_path / "copy"
        expected = "its weights do not fit its config.json: 12 weights the model has and the file lacks, left at random"
    elif case == "pickle":  # a pytorch_model.bin that would run code if unpickled in full

        class Payload:
            def __reduce__(self):
                return (print, ("pwned",))

        (tmp_path / "copy").mkdir()
        shutil.copy(saved / "export" / "config.json", tmp_path / "copy")
        (tmp_path / "copy" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
        args[1], expected = tmp_path / "copy", "its weights file is not plain tensors: torch.load(weights_only=True)"
    else:  # checked before the model is even loaded
        out = request.getfixturevalue("readonly_dir") / "r.json"
        args[-1] = out
        expected = f"cannot write --output {out}: " + (
            "read-only file system" if os.geteuid() == 0 else "permission denied"
        )
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "GPT2_REPRO_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "evaluate_gpt2.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=environ | {"GPT2_REPRO_HELLASWAG_URL": "http://127.0.0.1:9/x.jsonl"},
        timeout=600,
        cwd=ROOT,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0] and "Traceback" not in proc.stderr and "pwned" not in proc.stdout
    card = tmp_path / "copy" / "README.md"  # the model card of a copied folder is as it was
    assert not (tmp_path / "r.json").exists()
    assert not card.exists() or card.read_text() == (saved / "export" / "README.md").read_text()
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert ("torch" in imported) == (case in loaded)
