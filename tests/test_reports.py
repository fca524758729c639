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


def test_the_plot_shows_training_and_validation_loss_and_says_why_a_panel_is_empty(tmp_path, monkeypatch):
    """Drawn from any run's metrics.jsonl; without HellaSwag lines its panel states why instead of an empty axis. The
    figures are read as drawn (their texts, lines and legends), the PNG as written."""
    import json

    from matplotlib.figure import Figure
    from matplotlib.image import imread

    drawn, savefig = [], Figure.savefig

    def recording(fig, *args, **kwargs):  # the real savefig, keeping the figure it saved
        drawn.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    rows = [{"step": s, "loss": 10.0 - s / 20, "tokens": 256 * s} for s in range(1, 101)]
    rows += [{"step": s, "val_loss": 10.0 - s / 25} for s in (25, 50, 75, 100)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", {"model": "export"})
    assert png == tmp_path / "curves.png" and imread(png).shape[:2] == (480, 1300)
    loss, hellaswag = drawn[0].axes
    assert drawn[0].get_suptitle() == f"export: {tmp_path.name}/metrics.jsonl"
    legend = [t.get_text() for t in loss.get_legend().get_texts()]
    assert legend == [
        "training loss",
        "training loss (2-step mean)",
        "validation loss",
        "OpenAI GPT-2 124M (published): 3.2924",
    ]
    assert list(loss.lines[2].get_xdata()) == [6400, 12800, 19200, 25600]  # evaluations at their steps' tokens
    assert list(loss.lines[2].get_ydata()) == [9.0, 8.0, 7.0, 6.0]
    assert hellaswag.get_title() == "HellaSwag" and not hellaswag.lines  # no curve...
    (why,) = [t.get_text() for t in hellaswag.texts]  # ...but the reason, in the middle of the panel
    assert why.startswith("HellaSwag was not scored during this run") and "--hellaswag_file" in why

    rows += [{"step": s, "hellaswag_acc_norm": 0.25 + s / 1000} for s in (50, 100)]
    (tmp_path / "with_hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_training_curves(tmp_path / "with_hs.jsonl", tmp_path / "b.png", {"model": "x"}) == tmp_path / "b.png"
    hellaswag = drawn[1].axes[1]
    assert not hellaswag.texts and list(hellaswag.lines[0].get_ydata()) == [0.3, 0.35]
    assert [t.get_text() for t in hellaswag.get_legend().get_texts()] == [
        "this run",
        "OpenAI GPT-2 124M (published): 0.2955",
        "OpenAI GPT-3 124M: 0.337",
    ]
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "c.png", {"model": "x"}) is None
    assert len(drawn) == 2 and not (tmp_path / "c.png").exists()
