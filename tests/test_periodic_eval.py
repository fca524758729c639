"""training/periodic_eval.py: the evaluation during training, with a real one-process Accelerator: when it is due,
what it measures (the same kernels as evaluate_gpt2.py), what it logs, the samples, and a model gone bad."""

import json

import pytest
import torch

from gpt2_repro.base.config import load_config
from gpt2_repro.base.run_folder import RunFolder
from gpt2_repro.checkpointing.checkpoints import LastEval
from gpt2_repro.evaluation.scoring import score_hellaswag, validation_loss
from gpt2_repro.training.periodic_eval import Evaluator
from synthetic import SEQ_LEN, VAL_WINDOWS, hellaswag_examples, tiny_repro

SETTINGS = {
    "max_steps": "10",
    "warmup_steps": "2",
    "eval_every": "4",
    "seq_len": str(SEQ_LEN),
    "val_tokens": str(SEQ_LEN * VAL_WINDOWS),
}
SETTINGS |= {"eval_batch_size": "2", "num_samples": "2", "sample_tokens": "5", "n_positions": "128"}


def _evaluator(tmp_path, encoding, val_dir, line=1, hellaswag=None, **settings):
    from accelerate import Accelerator

    cfg = load_config(None, {**SETTINGS, **settings})
    said = []
    accelerator, folder = Accelerator(cpu=True), RunFolder(tmp_path)
    evaluator = Evaluator(cfg, accelerator, encoding, folder, said.append, str(val_dir), hellaswag, line)
    return evaluator, said


def test_due_at_every_interval_and_at_the_end(tmp_path, gpt2_encoding, val_dir):
    evaluator, _ = _evaluator(tmp_path, gpt2_encoding, val_dir)
    assert [s for s in range(1, 11) if evaluator.due(s)] == [4, 8, 10]
    only_end, _ = _evaluator(tmp_path, gpt2_encoding, val_dir, eval_every="0")
    assert [s for s in range(1, 11) if only_end.due(s)] == [10]


def test_an_evaluation_measures_logs_and_samples(tmp_path, gpt2_encoding, val_dir):
    examples = hellaswag_examples(5)
    evaluator, said = _evaluator(tmp_path, gpt2_encoding, val_dir, line=2, hellaswag=examples)
    model = tiny_repro(seed=1).train()
    rng = torch.get_rng_state()
    result = evaluator(model, 4)
    assert torch.equal(torch.get_rng_state(), rng)  # samples draw from a forked RNG: training's is untouched
    assert model.training  # back to training mode

    want_loss = validation_loss(model, str(val_dir), SEQ_LEN * VAL_WINDOWS, 2, SEQ_LEN)
    want = score_hellaswag(model, gpt2_encoding, examples, batch_size=2)
    assert result == LastEval(want_loss, 4, want["acc_norm"], want["acc"], 5)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    scores = {"hellaswag_acc_norm": want["acc_norm"], "hellaswag_acc": want["acc"]}
    assert row == {"step": 4, "val_loss": want_loss, **scores, "line": 2}
    assert said[0] == f"step 4: val_loss {want_loss:.4f}, hellaswag_acc_norm {want['acc_norm']:.4f}, " + (
        f"hellaswag_acc {want['acc']:.4f}"
    )
    samples = [s for s in said if s.startswith("--- sample")]
    assert len(samples) == 2
    assert evaluator.sample(model, 4) == evaluator.sample(model, 4) != evaluator.sample(model, 8)  # (seed, step)


def test_a_model_whose_outputs_are_not_finite_skips_hellaswag_and_samples_with_a_line(tmp_path, gpt2_encoding, val_dir):
    evaluator, said = _evaluator(tmp_path, gpt2_encoding, val_dir, hellaswag=hellaswag_examples(3))
    model = tiny_repro(seed=1)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    result = evaluator(model, 8)
    assert result.val_step == 8 and result.val_loss != result.val_loss  # NaN
    assert result.hellaswag_acc_norm is None and result.hellaswag_examples == 3
    assert any("not finite, so HellaSwag and samples are skipped" in s for s in said)
    assert not any(s.startswith("--- sample") for s in said)
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 8, "val_loss": None}


@pytest.mark.parametrize("line", [1, 3])
def test_metrics_name_the_line_of_training_from_line_2_on(tmp_path, gpt2_encoding, val_dir, line):
    evaluator, _ = _evaluator(tmp_path, gpt2_encoding, val_dir, line=line, num_samples="0")
    evaluator(tiny_repro(seed=2), 10)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row.get("line") == (None if line == 1 else line) and set(row) <= {"step", "val_loss", "line"}
