"""evaluation/scoring.py: HellaSwag scoring and validation loss, checked against direct computations on tiny models.

Everything is offline: the tests write their own HellaSwag-format jsonl, token shards (through shards.write_shard)
and checkpoints. The real tokenizer comes from the `gpt2_encoding` fixture.
"""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate_gpt2 as ev
from gpt2_repro.base.errors import ConfigError
from gpt2_repro.data.windows import iter_val_batches
from gpt2_repro.evaluation import scoring as evaluation
from gpt2_repro.evaluation.hellaswag import render_example
from gpt2_repro.evaluation.models import compile_body, load_model, nonfinite_parameters
from gpt2_repro.evaluation.scoring import (
    _model_to_run,
    hellaswag_losses,
    hellaswag_metric,
    score_hellaswag,
    stream_validation_tokens,
    validation_loss,
)
from synthetic import SENTENCE_WORDS, SEQ_LEN, VAL_WINDOWS, tiny_repro
from synthetic import hellaswag_examples as make_examples

ROOT = Path(__file__).resolve().parents[1]


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


def hand_hellaswag(model, encoding, examples):
    """build-nanogpt's scoring, one row per forward pass, full logits: (losses (N, 4), lengths (N, 4))."""
    losses, lengths = [], []
    for ex in examples:
        ctx = encoding.encode(ex["ctx"])
        row_losses, row_lengths = [], []
        for ending in ex["endings"]:
            end = encoding.encode(" " + ending)
            with torch.no_grad():  # the row's last token predicts nothing: the model reads all but it
                logits = model(torch.tensor([(ctx + end)[:-1]])).logits[0].float()  # (T - 1, V)
            # position t predicts token t + 1: the ending's tokens are predicted at len(ctx) - 1 ... T - 2
            row_losses.append(F.cross_entropy(logits[len(ctx) - 1 :], torch.tensor(end), reduction="sum").item())
            row_lengths.append(len(end))
        losses.append(row_losses)
        lengths.append(row_lengths)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(lengths)


# ------------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("kind", ["repro", "stock_gpt2", "llama"])
def test_scoring_matches_hand_computation(kind, repro, gpt2_encoding):
    model = {"repro": lambda: repro, "stock_gpt2": repro.to_official_gpt2, "llama": tiny_llama}[kind]()
    examples = make_examples(10)
    want_losses, want_lengths = hand_hellaswag(model, gpt2_encoding, examples)
    # Labels chosen so that acc and acc_norm are different, non-trivial fractions.
    for i, ex in enumerate(examples):
        ex["label"] = int((want_losses[i] / want_lengths[i]).argmin() if i % 3 else want_losses[i].argmax())
    labels = torch.tensor([ex["label"] for ex in examples])
    want_acc = (want_losses.argmin(1) == labels).double().mean().item()
    want_acc_norm = ((want_losses / want_lengths).argmin(1) == labels).double().mean().item()

    losses, lengths, got_labels = hellaswag_losses(model, gpt2_encoding, examples, batch_size=4)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-4)
    assert torch.equal(lengths, want_lengths) and torch.equal(got_labels, labels)
    result = score_hellaswag(model, gpt2_encoding, examples, batch_size=4)
    assert result == {"acc": pytest.approx(want_acc), "acc_norm": pytest.approx(want_acc_norm), "n": 10}
    assert 0 < want_acc < 1 and 0 < want_acc_norm < 1 and want_acc != want_acc_norm


def test_batched_equals_unbatched(repro, gpt2_encoding):
    examples = make_examples(11, seed=3)
    one = hellaswag_losses(repro, gpt2_encoding, examples, batch_size=1)
    many = hellaswag_losses(repro, gpt2_encoding, examples, batch_size=4)  # 4 + 4 + 3: uneven batches
    torch.testing.assert_close(many[0], one[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(many[1], one[1]) and torch.equal(many[2], one[2])
    assert torch.equal((many[0] / many[1]).argmin(1), (one[0] / one[1]).argmin(1))
    scores = [score_hellaswag(repro, gpt2_encoding, examples, batch_size) for batch_size in (1, 5)]
    assert scores[0] == scores[1]


def test_fast_path_equals_model_forward(repro, gpt2_encoding, monkeypatch):
    """Backbone + head on the scored positions only == the model's own forward (logits_to_keep)."""
    examples = make_examples(6, seed=4)
    fast = hellaswag_losses(repro, gpt2_encoding, examples, batch_size=3)
    monkeypatch.setattr(evaluation, "FAST_MODEL_TYPES", ())
    assert _model_to_run(repro)[1:] == (False, False)  # not fast, not sharded
    generic = hellaswag_losses(repro, gpt2_encoding, examples, batch_size=3)
    torch.testing.assert_close(fast[0], generic[0], rtol=1e-5, atol=1e-4)


def test_long_context_keeps_its_latest_tokens(gpt2_encoding):
    model = tiny_repro(n_positions=16)
    ex = {
        "ctx": " ".join(SENTENCE_WORDS),
        "endings": ["the dog runs", "a cat", "it jumps over the ball", "she"],
        "label": 0,
    }
    ctx, endings = render_example(gpt2_encoding, ex, max_len=16)
    full = gpt2_encoding.encode(ex["ctx"])
    assert ctx == full[-len(ctx) :] and len(ctx) + max(map(len, endings)) - 1 == 16
    truncated = {**ex, "ctx": gpt2_encoding.decode(ctx)}
    assert gpt2_encoding.encode(truncated["ctx"]) == ctx
    want, _ = hand_hellaswag(model, gpt2_encoding, [truncated])
    got, _, _ = hellaswag_losses(model, gpt2_encoding, [ex])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit the model's context"):
        render_example(gpt2_encoding, {**ex, "endings": [" ".join(SENTENCE_WORDS)] * 4}, max_len=16)


def test_prepared_compiled_training_model(repro, gpt2_encoding):
    """The trainer passes its accelerate-prepared, torch.compile'd model in train mode: same numbers, mode kept."""
    from accelerate import Accelerator

    examples = make_examples(5, seed=5)
    want = hellaswag_losses(repro, gpt2_encoding, examples)[0]
    accelerator = Accelerator(cpu=True)
    model = torch.compile(accelerator.prepare(tiny_repro()))
    model.train()
    got = hellaswag_losses(model, gpt2_encoding, examples, accelerator=accelerator)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert model.training and model._orig_mod.training


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor needs a C++ compiler")
def test_compile_option_gives_the_same_scores(repro, gpt2_encoding, val_dir):
    """evaluate_gpt2.py --compile: the body compiled with dynamic shapes scores exactly like the eager model."""
    examples = make_examples(12, seed=9)  # contexts and endings of many lengths: batches of several shapes
    want = hellaswag_losses(repro, gpt2_encoding, examples, batch_size=4)[0]
    want_val = validation_loss(repro, val_dir, SEQ_LEN * VAL_WINDOWS, 2, SEQ_LEN)
    compiled = compile_body(tiny_repro())
    got = hellaswag_losses(compiled, gpt2_encoding, examples, batch_size=4)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert validation_loss(compiled, val_dir, SEQ_LEN * VAL_WINDOWS, 2, SEQ_LEN) == pytest.approx(want_val, rel=1e-5)
    assert type(compiled.transformer).__name__ == "OptimizedModule"


@pytest.mark.gpu
def test_compiled_bf16_model_on_cuda_scores_like_fp32(repro, gpt2_encoding, val_dir):
    """What train.py hands the evaluation on a GPU: prepared for bf16 autocast and torch.compile'd."""
    from accelerate import Accelerator

    examples = make_examples(16, seed=8)
    want = score_hellaswag(repro, gpt2_encoding, examples)
    want_val = validation_loss(repro, val_dir, SEQ_LEN * VAL_WINDOWS, 4, SEQ_LEN)
    accelerator = Accelerator(mixed_precision="bf16", dynamo_backend="inductor")
    model = accelerator.prepare(tiny_repro())
    model.train()
    got = score_hellaswag(model, gpt2_encoding, examples, accelerator=accelerator)
    got_val = validation_loss(model, val_dir, SEQ_LEN * VAL_WINDOWS, 4, SEQ_LEN, accelerator)
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
        assert validation_loss(repro, val_dir, tokens, batch_size, SEQ_LEN) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="longer than the model's context"):
        validation_loss(repro, val_dir, tokens, 1, seq_len=256)


def test_validation_on_a_stream_reads_what_its_val_shard_holds(repro, gpt2_encoding, fineweb, tmp_path):
    """--dataset: the stream's first tokens, exactly data_prep.py's val shard: the same loss as on the shards."""
    from gpt2_repro.data import prepare as data_prep

    path, _ = fineweb
    need = SEQ_LEN * VAL_WINDOWS + 1
    data_prep.prepare(
        data_prep.PrepConfig(dataset=str(path), output_dir=str(tmp_path), val_tokens=need, progress=False)
    )
    args = ev.parse_args(["--model", "x", "--dataset", str(path), "--val_tokens", str(need - 1)])
    source = (args.dataset, args.dataset_name, args.dataset_split, args.text_column)
    tokens = stream_validation_tokens(source, gpt2_encoding, args.val_tokens, SEQ_LEN)
    assert len(tokens) == need
    on_shards = validation_loss(repro, tmp_path, need - 1, 2, SEQ_LEN)
    assert validation_loss(repro, tokens, need - 1, 2, SEQ_LEN) == on_shards
    with pytest.raises(ConfigError, match="not both"):
        ev.parse_args(["--model", "x", "--dataset", str(path), "--data_dir", str(tmp_path)])


def test_our_model_and_its_stock_export_score_the_same(repro, gpt2_encoding, val_dir, tmp_path):
    """Saved and reloaded through the Auto classes: ours (gpt2_repro) and its GPT2LMHeadModel export."""
    repro.save_pretrained(tmp_path / "ours")
    repro.to_official_gpt2().save_pretrained(tmp_path / "stock")
    ours, stock = load_model(str(tmp_path / "ours")), load_model(str(tmp_path / "stock"))
    assert type(ours).__name__ == "GPT2ReproForCausalLM" and type(stock).__name__ == "GPT2LMHeadModel"
    examples = make_examples(8, seed=6)
    a, b = (hellaswag_losses(m, gpt2_encoding, examples, batch_size=3) for m in (ours, stock))
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-4)
    assert score_hellaswag(ours, gpt2_encoding, examples) == score_hellaswag(stock, gpt2_encoding, examples)
    losses = [validation_loss(m, val_dir, SEQ_LEN * VAL_WINDOWS, 2, SEQ_LEN) for m in (ours, stock)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


# ---------------------------------------------------------------------------------------------- bad inputs
def test_vocabulary_smaller_than_gpt2s_is_refused(gpt2_encoding, val_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    small = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_layer=1, n_head=2, n_embd=32, n_positions=64)).eval()
    with pytest.raises(ValueError, match=r"vocabulary has 1000 ids but the GPT-2 tokenizer has 50257"):
        score_hellaswag(small, gpt2_encoding, make_examples(2))
    with pytest.raises(ValueError, match=r"vocabulary has 1000 ids"):
        validation_loss(small, val_dir, SEQ_LEN, 1, SEQ_LEN)


def test_metric_module_loads_offline_and_counts():
    metric = hellaswag_metric()
    got = metric.compute(
        ending_losses=[[4.0, 9.0, 5.0, 6.0], [3.0, 2.5, 8.0, 2.6]],
        ending_lengths=[[1, 3, 1, 1], [1, 1, 4, 1]],
        references=[1, 2],
    )
    assert got == {"acc": 0.0, "acc_norm": 1.0, "n": 2}  # sums pick 0 and 1; per token (9/3, 8/4) 1 and 2
    with pytest.raises(ValueError, match="ending_lengths must be > 0"):
        metric.compute(ending_losses=[[1.0, 2.0]], ending_lengths=[[0, 1]], references=[0])


def test_nonfinite_parameters_names_them():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[0].bias[1] = float("nan")
        model[1].weight[0] = float("inf")
    assert nonfinite_parameters(model) == ["0.bias", "1.weight"]


@pytest.mark.parametrize(("layers", "expected"), [(1, "in the file that the model has no place for"), (3, "lacks")])
def test_weights_that_do_not_fit_the_config_are_refused(repro, tmp_path, layers, expected):
    """config.json edited after saving (n_layer 2 -> 1 or 3): transformers would load what fits and leave the rest
    out or at random; load_model refuses it, naming what does not fit."""
    import json

    from gpt2_repro.base.errors import EvaluationInputError

    repro.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_layer": layers}))
    with pytest.raises(EvaluationInputError, match=f"its weights do not fit its config.json: 12 weights .*{expected}"):
        load_model(str(tmp_path))
