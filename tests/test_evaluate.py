"""evaluate_gpt2.py: HellaSwag scoring and validation loss, checked against direct computations on tiny models.

Everything is offline: the tests write their own HellaSwag-format jsonl, token shards (through token_data's
write_shard) and checkpoints. The real tokenizer comes from the `gpt2_encoding` fixture.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard

import evaluate_gpt2 as ev
import hub
from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM
from synthetic import SENTENCE_WORDS, write_jsonl
from synthetic import hellaswag_examples as make_examples
from token_data import iter_val_batches, write_shard

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, VAL_WINDOWS = 64, 5  # an odd number of windows: two processes get 3 and 2


def tiny_repro(seed: int = 0, n_positions: int = 128) -> GPT2ReproForCausalLM:
    torch.manual_seed(seed)
    config = GPT2ReproConfig(
        n_layer=2, n_head=4, n_embd=64, n_positions=n_positions, vocab_size=50304
    )
    return GPT2ReproForCausalLM(config).eval()


def tiny_llama():
    """A causal LM that is neither GPT-2 nor ours: exercises the generic (model forward) path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=50257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def repro():
    return tiny_repro()


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    """A val shard of SEQ_LEN * VAL_WINDOWS + 1 GPT-2 ids, written with data_prep's public writer."""
    folder = tmp_path_factory.mktemp("shards")
    tokens = np.random.default_rng(0).integers(0, 50257, SEQ_LEN * VAL_WINDOWS + 1, dtype=np.uint16)
    write_shard(folder / "test_val_000000.bin", tokens)
    return folder


def hand_hellaswag(model, encoding, examples):
    """build-nanogpt's scoring, one row per forward pass, full logits: (losses (N, 4), lengths (N, 4))."""
    losses, lengths = [], []
    for ex in examples:
        ctx = encoding.encode(ex["ctx"])
        row_losses, row_lengths = [], []
        for ending in ex["endings"]:
            end = encoding.encode(" " + ending)
            with (
                torch.no_grad()
            ):  # the row's last token predicts nothing: the model reads all but it
                logits = model(torch.tensor([(ctx + end)[:-1]])).logits[0].float()  # (T - 1, V)
            # position t predicts token t + 1: the ending's tokens are predicted at len(ctx) - 1 ... T - 2
            row_losses.append(
                F.cross_entropy(logits[len(ctx) - 1 :], torch.tensor(end), reduction="sum").item()
            )
            row_lengths.append(len(end))
        losses.append(row_losses)
        lengths.append(row_lengths)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(lengths)


# ------------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("kind", ["repro", "stock_gpt2", "llama"])
def test_scoring_matches_hand_computation(kind, repro, gpt2_encoding):
    model = {"repro": lambda: repro, "stock_gpt2": repro.to_official_gpt2, "llama": tiny_llama}[
        kind
    ]()
    examples = make_examples(10)
    want_losses, want_lengths = hand_hellaswag(model, gpt2_encoding, examples)
    # Labels chosen so that acc and acc_norm are different, non-trivial fractions.
    for i, ex in enumerate(examples):
        ex["label"] = int(
            (want_losses[i] / want_lengths[i]).argmin() if i % 3 else want_losses[i].argmax()
        )
    labels = torch.tensor([ex["label"] for ex in examples])
    want_acc = (want_losses.argmin(1) == labels).double().mean().item()
    want_acc_norm = ((want_losses / want_lengths).argmin(1) == labels).double().mean().item()

    losses, lengths, got_labels = ev.hellaswag_losses(model, gpt2_encoding, examples, batch_size=4)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-4)
    assert torch.equal(lengths, want_lengths) and torch.equal(got_labels, labels)
    result = ev.score_hellaswag(model, gpt2_encoding, examples, batch_size=4)
    assert result == {
        "acc": pytest.approx(want_acc),
        "acc_norm": pytest.approx(want_acc_norm),
        "n": 10,
    }
    assert 0 < want_acc < 1 and 0 < want_acc_norm < 1 and want_acc != want_acc_norm


def test_batched_equals_unbatched(repro, gpt2_encoding):
    examples = make_examples(11, seed=3)
    one = ev.hellaswag_losses(repro, gpt2_encoding, examples, batch_size=1)
    many = ev.hellaswag_losses(
        repro, gpt2_encoding, examples, batch_size=4
    )  # 4 + 4 + 3: uneven batches
    torch.testing.assert_close(many[0], one[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(many[1], one[1]) and torch.equal(many[2], one[2])
    assert torch.equal((many[0] / many[1]).argmin(1), (one[0] / one[1]).argmin(1))
    scores = [
        ev.score_hellaswag(repro, gpt2_encoding, examples, batch_size) for batch_size in (1, 5)
    ]
    assert scores[0] == scores[1]


def test_fast_path_equals_model_forward(repro, gpt2_encoding, monkeypatch):
    """Backbone + head on the scored positions only == the model's own forward (logits_to_keep)."""
    examples = make_examples(6, seed=4)
    fast = ev.hellaswag_losses(repro, gpt2_encoding, examples, batch_size=3)
    monkeypatch.setattr(ev, "FAST_MODEL_TYPES", ())
    assert ev._model_to_run(repro)[1] is False
    generic = ev.hellaswag_losses(repro, gpt2_encoding, examples, batch_size=3)
    torch.testing.assert_close(fast[0], generic[0], rtol=1e-5, atol=1e-4)


def test_long_context_keeps_its_latest_tokens(gpt2_encoding):
    model = tiny_repro(n_positions=16)
    ex = {
        "ctx": " ".join(SENTENCE_WORDS),
        "endings": ["the dog runs", "a cat", "it jumps over the ball", "she"],
        "label": 0,
    }
    ctx, endings = ev.render_example(gpt2_encoding, ex, max_len=16)
    full = gpt2_encoding.encode(ex["ctx"])
    assert ctx == full[-len(ctx) :] and len(ctx) + max(map(len, endings)) - 1 == 16
    truncated = {**ex, "ctx": gpt2_encoding.decode(ctx)}
    assert gpt2_encoding.encode(truncated["ctx"]) == ctx
    want, _ = hand_hellaswag(model, gpt2_encoding, [truncated])
    got, _, _ = ev.hellaswag_losses(model, gpt2_encoding, [ex])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit the model's context"):
        ev.render_example(
            gpt2_encoding, {**ex, "endings": [" ".join(SENTENCE_WORDS)] * 4}, max_len=16
        )


def test_prepared_compiled_training_model(repro, gpt2_encoding):
    """The trainer passes its accelerate-prepared, torch.compile'd model in train mode: same numbers, mode kept."""
    from accelerate import Accelerator

    examples = make_examples(5, seed=5)
    want = ev.hellaswag_losses(repro, gpt2_encoding, examples)[0]
    accelerator = Accelerator(cpu=True)
    model = torch.compile(accelerator.prepare(tiny_repro()))
    model.train()
    got = ev.hellaswag_losses(model, gpt2_encoding, examples, accelerator=accelerator)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert model.training and model._orig_mod.training


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="inductor needs a C++ compiler",
)
def test_compile_option_gives_the_same_scores(repro, gpt2_encoding, val_dir):
    """evaluate_gpt2.py --compile: the body compiled with dynamic shapes scores exactly like the eager model."""
    examples = make_examples(
        12, seed=9
    )  # contexts and endings of many lengths: batches of several shapes
    want = ev.hellaswag_losses(repro, gpt2_encoding, examples, batch_size=4)[0]
    want_val = ev.validation_loss(repro, val_dir, SEQ_LEN * VAL_WINDOWS, 2, SEQ_LEN)
    compiled = ev.compile_body(tiny_repro())
    got = ev.hellaswag_losses(compiled, gpt2_encoding, examples, batch_size=4)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert ev.validation_loss(
        compiled, val_dir, SEQ_LEN * VAL_WINDOWS, 2, SEQ_LEN
    ) == pytest.approx(want_val, rel=1e-5)
    assert type(compiled.transformer).__name__ == "OptimizedModule"


@pytest.mark.gpu
def test_compiled_bf16_model_on_cuda_scores_like_fp32(repro, gpt2_encoding, val_dir):
    """What train.py hands the evaluation on a GPU: prepared for bf16 autocast and torch.compile'd."""
    from accelerate import Accelerator

    examples = make_examples(16, seed=8)
    want = ev.score_hellaswag(repro, gpt2_encoding, examples)
    want_val = ev.validation_loss(repro, val_dir, SEQ_LEN * VAL_WINDOWS, 4, SEQ_LEN)
    accelerator = Accelerator(mixed_precision="bf16", dynamo_backend="inductor")
    model = accelerator.prepare(tiny_repro())
    model.train()
    got = ev.score_hellaswag(model, gpt2_encoding, examples, accelerator=accelerator)
    got_val = ev.validation_loss(model, val_dir, SEQ_LEN * VAL_WINDOWS, 4, SEQ_LEN, accelerator)
    assert got_val == pytest.approx(want_val, rel=0.01)
    assert abs(got["acc_norm"] - want["acc_norm"]) <= 2 / len(examples)  # bf16 may flip a near-tie
    assert model.training


# ---------------------------------------------------------------------------------------------- validation
def test_validation_loss_matches_direct(repro, val_dir):
    tokens = SEQ_LEN * VAL_WINDOWS
    batches = list(iter_val_batches(val_dir, 2, SEQ_LEN, tokens))
    with torch.no_grad():  # the model's own loss (mean over each batch), weighted by tokens
        total = sum(repro(x, shift_labels=y).loss.double() * y.numel() for x, y in batches)
    want = (total / tokens).item()
    for batch_size in (1, 2, 5):
        assert ev.validation_loss(repro, val_dir, tokens, batch_size, SEQ_LEN) == pytest.approx(
            want, rel=1e-6
        )
    with pytest.raises(ValueError, match="longer than the model's context"):
        ev.validation_loss(repro, val_dir, tokens, 1, seq_len=256)


def test_validation_on_a_stream_reads_what_its_val_shard_holds(
    repro, gpt2_encoding, fineweb, tmp_path
):
    """--dataset: the stream's first tokens, exactly data_prep.py's val shard: the same loss as on the shards."""
    import data_prep

    path, _ = fineweb
    need = SEQ_LEN * VAL_WINDOWS + 1
    data_prep.prepare(
        data_prep.PrepConfig(
            dataset=str(path), output_dir=str(tmp_path), val_tokens=need, progress=False
        )
    )
    args = ev.parse_args(["--model", "x", "--dataset", str(path), "--val_tokens", str(need - 1)])
    args.seq_len = SEQ_LEN
    tokens = ev.stream_validation_tokens(args, gpt2_encoding)
    assert len(tokens) == need
    on_shards = ev.validation_loss(repro, tmp_path, need - 1, 2, SEQ_LEN)
    assert ev.validation_loss(repro, tokens, need - 1, 2, SEQ_LEN) == on_shards
    with pytest.raises(ev.ConfigError, match="not both"):
        ev.parse_args(["--model", "x", "--dataset", str(path), "--data_dir", str(tmp_path)])


def test_our_model_and_its_stock_export_score_the_same(repro, gpt2_encoding, val_dir, tmp_path):
    """Saved and reloaded through the Auto classes: ours (gpt2_repro) and its GPT2LMHeadModel export."""
    repro.save_pretrained(tmp_path / "ours")
    repro.to_official_gpt2().save_pretrained(tmp_path / "stock")
    ours, stock = ev.load_model(str(tmp_path / "ours")), ev.load_model(str(tmp_path / "stock"))
    assert (
        type(ours).__name__ == "GPT2ReproForCausalLM" and type(stock).__name__ == "GPT2LMHeadModel"
    )
    examples = make_examples(8, seed=6)
    a, b = (ev.hellaswag_losses(m, gpt2_encoding, examples, batch_size=3) for m in (ours, stock))
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-4)
    assert ev.score_hellaswag(ours, gpt2_encoding, examples) == ev.score_hellaswag(
        stock, gpt2_encoding, examples
    )
    losses = [
        ev.validation_loss(m, val_dir, SEQ_LEN * VAL_WINDOWS, 2, SEQ_LEN) for m in (ours, stock)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1',
            r"bad\.jsonl:2: not valid JSON",
        ),
        (
            '{"ctx": "A man", "endings": ["a", "b", "c", "d"]}',
            r"bad\.jsonl:2: missing field\(s\) \['label'\]",
        ),
        (
            '{"ctx": "A man", "endings": ["a", "b"], "label": 1}',
            r"endings must be a list of 4 strings",
        ),
        (
            '{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": ""}',
            r"label must be the index 0-3",
        ),
        ('["A man", ["a", "b", "c", "d"], 1]', r"expected a JSON object"),
    ],
)
def test_malformed_hellaswag_lines(tmp_path, line, message):
    good = json.dumps(
        {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "2"}
    )  # Hub copy: str label
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        ev.load_hellaswag(path)
    assert ev.load_hellaswag(path, limit=1) == [
        {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 2}
    ]


def test_missing_hellaswag_file(tmp_path):
    with pytest.raises(ev.HellaSwagUnavailable, match="Pass the path of hellaswag_val.jsonl"):
        ev.load_hellaswag(tmp_path / "nope.jsonl")


def test_hellaswag_download_when_online():
    """The real thing: download (or find in the cache) all 10,042 validation examples. Skips only offline."""
    try:
        path = ev.download_hellaswag()
    except ev.HellaSwagUnavailable as e:
        pytest.skip(f"HellaSwag cannot be downloaded here: {e}")
    examples = ev.load_hellaswag(path)
    assert len(examples) == hub.HELLASWAG_VAL_SIZE and {ex["label"] for ex in examples} == {
        0,
        1,
        2,
        3,
    }


def test_vocabulary_smaller_than_gpt2s_is_refused(gpt2_encoding, val_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    small = GPT2LMHeadModel(
        GPT2Config(vocab_size=1000, n_layer=1, n_head=2, n_embd=32, n_positions=64)
    ).eval()
    with pytest.raises(
        ValueError, match=r"vocabulary has 1000 ids but the GPT-2 tokenizer has 50257"
    ):
        ev.score_hellaswag(small, gpt2_encoding, make_examples(2))
    with pytest.raises(ValueError, match=r"vocabulary has 1000 ids"):
        ev.validation_loss(small, val_dir, SEQ_LEN, 1, SEQ_LEN)


def test_metric_module_loads_offline_and_counts():
    metric = ev.hellaswag_metric()
    got = metric.compute(
        ending_losses=[[4.0, 9.0, 5.0, 6.0], [3.0, 2.5, 8.0, 2.6]],
        ending_lengths=[[1, 3, 1, 1], [1, 1, 4, 1]],
        references=[1, 2],
    )
    assert got == {
        "acc": 0.0,
        "acc_norm": 1.0,
        "n": 2,
    }  # sums pick 0 and 1; per token (9/3, 8/4) 1 and 2
    with pytest.raises(ValueError, match="ending_lengths must be > 0"):
        metric.compute(ending_losses=[[1.0, 2.0]], ending_lengths=[[0, 1]], references=[0])


# ------------------------------------------------------------------------------------------- reports, CLI
def test_model_card_section_is_replaced_not_duplicated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "---\nlicense: mit\ntags:\n- gpt2\n---\n# My run\n\nTrained on FineWeb-Edu.\n"
    )
    results = {
        "model": str(tmp_path),
        "date": "today",
        "val_loss": 3.5,
        "val_tokens": 64,
        "seq_len": 64,
    }
    results.update(
        hellaswag_acc=0.25, hellaswag_acc_norm=0.27, hellaswag_examples=100, compare=None
    )
    ev.write_results_to_card(tmp_path, results)
    ev.write_results_to_card(
        tmp_path, {**results, "hellaswag_acc_norm": 0.31, "hellaswag_examples": 10042}
    )
    text = readme.read_text()
    assert text.startswith("---\n") and "license: mit" in text and "Trained on FineWeb-Edu." in text
    assert text.count(hub.CARD_START) == 1 and "| 0.3100 |" in text and "| 0.2700 |" not in text
    assert "model-index" in text and "acc_norm" in text  # all 10,042 examples: Hub metadata too


def test_read_eval_curves_skips_other_and_partial_lines(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        '{"step": 0, "loss": 10.9}\n{"step": 0, "val_loss": 10.8, "hellaswag_acc_norm": 0.25}\n'
        'garbage\n{"step": 5, "val_loss": 9.5}\n{"step": 10, "val_lo'
    )
    assert ev.read_eval_curves(log) == {
        "val_loss": [(0, 10.8), (5, 9.5)],
        "hellaswag_acc_norm": [(0, 0.25)],
    }


def run_cli(*args, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", **env}
    cmd = [sys.executable, str(ROOT / "evaluate_gpt2.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def saved(tmp_path_factory, repro):
    """A run folder as the trainer leaves it: export/ (our model + model card), export-gpt2/, metrics.jsonl."""
    run = tmp_path_factory.mktemp("run")
    repro.save_pretrained(run / "export")
    (run / "export" / "README.md").write_text(
        "---\nlicense: mit\n---\n# tiny run\n\nNotes that must survive.\n"
    )
    repro.to_official_gpt2().save_pretrained(run / "export-gpt2")
    lines = [{"step": s, "loss": 11 - s / 10} for s in range(0, 40, 5)]
    lines += [
        {"step": s, "val_loss": 10.9 - s / 20, "hellaswag_acc_norm": 0.24 + s / 1000}
        for s in (0, 20, 40)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


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
        "--limit",
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
    want_hs = ev.score_hellaswag(repro, gpt2_encoding, examples[:7])
    want_val = ev.validation_loss(repro, val_dir, SEQ_LEN * VAL_WINDOWS, 8, SEQ_LEN)
    assert (
        results["val_loss"] == pytest.approx(want_val, rel=1e-6) and results["seq_len"] == SEQ_LEN
    )
    assert results["hellaswag_examples"] == 7
    assert (results["hellaswag_acc"], results["hellaswag_acc_norm"]) == (
        want_hs["acc"],
        want_hs["acc_norm"],
    )
    cmp = results["compare"]  # the stock export, evaluated on the same data: the same numbers
    assert cmp["evaluated"] and cmp["val_loss"] == pytest.approx(want_val, rel=1e-6)
    assert cmp["hellaswag_acc_norm"] == want_hs["acc_norm"]
    assert f"| `{saved / 'export-gpt2'}`, evaluated here on the same data |" in proc.stdout
    assert "| OpenAI GPT-2 124M, published | 3.2924 | 0.2955 | 0.2859 |" in proc.stdout
    assert "| OpenAI GPT-3 124M, published | - | 0.3370 |" in proc.stdout
    png = Path(
        results["plot"]
    )  # the run's metrics.jsonl, found two levels up from the model folder
    assert png == out.with_suffix(".png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (saved / "export" / "README.md").read_text()
    assert (
        "Notes that must survive." in card
        and hub.CARD_START in card
        and f"{want_hs['acc_norm']:.4f}" in card
    )
    assert str(saved) not in card and "| this model (`export`) |" in card  # no local path
    assert "| `export-gpt2`, evaluated here on the same data |" in card
    # model-index: the measured validation loss; HellaSwag only when all of it was scored (here 7 examples)
    results = ModelCard(card).data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [("loss", round(want_val, 4))]


def test_cli_offline_without_hellaswag_warns_and_falls_back(saved, val_dir, tmp_path):
    """No HellaSwag file, no network, `--compare gpt2` not in the cache: a warning each, no crash."""
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
    assert (
        results["val_loss"] > 0
        and results["hellaswag_acc"] is None
        and results["hellaswag_examples"] == 0
    )
    assert results["compare"]["evaluated"] is False and results["compare"]["val_loss"] == 3.2924
    assert "`gpt2` could not be loaded here" in proc.stdout and "evaluated here" not in proc.stdout
    assert not (saved / "export-gpt2" / "README.md").exists()


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
    environ = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
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
@pytest.mark.parametrize("case", ["no_model", "bad_hellaswag", "seq_len", "nan_weights"])
def test_cli_input_errors_exit_2_with_one_line(case, saved, val_dir, tmp_path):
    """Input errors end with one `error:` line naming the problem and the fix, exit code 2, no traceback."""
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
    else:
        broken = tiny_repro()
        with torch.no_grad():
            broken.lm_head.weight[7, 3] = float("nan")  # tied: the embedding too
        broken.save_pretrained(tmp_path / "diverged")
        args[1], expected = tmp_path / "diverged", "weight tensor(s) hold NaN or inf"
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "GPT2_REPRO_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate_gpt2.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=environ | {"GPT2_REPRO_HELLASWAG_URL": "http://127.0.0.1:9/x.jsonl"},
        timeout=600,
        cwd=ROOT,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.json").exists()
