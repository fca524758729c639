"""evaluation/reports.py: the model card's evaluation section, the training curves read from metrics.jsonl."""

from gpt2_repro.evaluation.reports import plot_training_curves, read_curves, write_results_to_card
from gpt2_repro.publishing.cards import CARD_START


def test_model_card_section_is_replaced_not_duplicated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: mit\ntags:\n- gpt2\n---\n# My run\n\nTrained on FineWeb-Edu.\n")
    results = {"model": str(tmp_path), "date": "today", "val_loss": 3.5, "val_tokens": 64, "seq_len": 64}
    results.update(hellaswag_acc=0.25, hellaswag_acc_norm=0.27, hellaswag_examples=100, compare=None)
    write_results_to_card(tmp_path, results)
    write_results_to_card(tmp_path, {**results, "hellaswag_acc_norm": 0.31, "hellaswag_examples": 10042})
    text = readme.read_text()
    assert text.startswith("---\n") and "license: mit" in text and "Trained on FineWeb-Edu." in text
    assert text.count(CARD_START) == 1 and "| 0.3100 |" in text and "| 0.2700 |" not in text
    assert "model-index" in text and "acc_norm" in text  # all 10,042 examples: Hub metadata too


def test_read_curves_places_evaluations_at_their_tokens_and_skips_partial_lines(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        '{"step": 1, "loss": 10.9, "tokens": 100}\n{"step": 1, "val_loss": 10.8, "hellaswag_acc_norm": 0.25}\n'
        'garbage\n{"step": 2, "loss": null, "tokens": 200, "skipped": true}\n{"step": 5, "val_loss": 9.5}\n'
        '{"step": 10, "val_lo'
    )
    assert read_curves(log) == {
        "loss": [(100, 10.9)],  # the skipped step's null is left out
        "val_loss": [(100, 10.8), (500.0, 9.5)],  # step 5 has no line of its own: 5 x 100 tokens per step
        "hellaswag_acc_norm": [(100, 0.25)],
    }


def test_the_plot_shows_training_and_validation_loss_and_says_why_a_panel_is_empty(tmp_path):
    """Drawn from any run's metrics.jsonl; without HellaSwag lines its panel states why instead of an empty axis."""
    import json

    from matplotlib.image import imread

    log = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 - s / 20, "tokens": 256 * s} for s in range(1, 101)]
    rows += [{"step": s, "val_loss": 10.0 - s / 25} for s in (25, 50, 75, 100)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_training_curves(log, tmp_path / "curves.png", {"model": "export"})
    assert png == tmp_path / "curves.png" and imread(png).shape[:2] == (480, 1300)
    assert plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "b.png", {"model": "x"}) is not None
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "c.png", {"model": "x"}) is None
