"""evaluation/reports.py: the model card's evaluation section, the training curves read from metrics.jsonl."""

import json

import yaml

from gpt2_repro.evaluation.reports import (
    format_tokens,
    plot_training_curves,
    read_curves,
    training_curves_figure,
    write_results_to_card,
)
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
    assert legend == ["training loss", "training loss (2-step mean)", "validation loss"]  # data unknown: no GPT-2 line
    assert [t.get_text() for t in loss.texts] == [
        "OpenAI GPT-2 124M's published 3.2924 is on FineWeb-Edu sample-10BT;\nthis run's data is not known"
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


def _run_on(folder, source, rows):
    """A run folder trained on the data whose data_prep.py manifest records `source`, with metrics.jsonl `rows`."""
    data, run = folder / "data", folder / "run"
    data.mkdir(parents=True)
    run.mkdir()
    (data / "manifest.json").write_text(json.dumps({"source": source}))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"data_dir": str(data), "dataset": None}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run / "metrics.jsonl"


def test_the_published_gpt2_loss_is_drawn_only_over_its_own_data_and_tokens_read_as_50K(tmp_path):
    """OpenAI GPT-2's 3.2924 was measured on FineWeb-Edu sample-10BT: a run on other text gets no such line (which
    would also stretch the axis down to 3) but a note, a run on FineWeb-Edu gets it, and a model evaluated here on
    the run's own data is drawn instead. Token ticks read 100K, not 100000."""
    rows = [{"step": s, "loss": 10.0 - s / 50, "tokens": 2048 * s} for s in range(1, 201)]
    rows += [{"step": s, "val_loss": 8.0 - s / 100} for s in (50, 100, 150, 200)]
    text = {"dataset": "/home/me/data/tinyshakespeare.txt", "data_files": ["/home/me/data/tinyshakespeare.txt"]}
    fig = training_curves_figure(_run_on(tmp_path / "a", text, rows), {"model": "export"})
    ax = fig.axes[0]
    assert not [label for label in ax.get_legend_handles_labels()[1] if "GPT-2" in label]
    assert ax.get_ylim()[0] > 5.5  # the data's range, not stretched to a line at 3.29
    assert "this run's data is tinyshakespeare" in " ".join(t.get_text() for t in ax.texts)
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert "200K" in ticks and "400K" in ticks and not [t for t in ticks if "000" in t], ticks
    fineweb = {"dataset": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"}
    fig = training_curves_figure(_run_on(tmp_path / "b", fineweb, rows), {"model": "export"})
    assert "OpenAI GPT-2 124M (published): 3.2924" in fig.axes[0].get_legend_handles_labels()[1]
    compared = {"model": "export", "compare": {"model": "gpt2", "evaluated": True, "val_loss": 6.5}}
    compared["run_eval"] = {"same_data": True, "same_tokens": True}
    fig = training_curves_figure(_run_on(tmp_path / "c", text, rows), compared)
    assert "gpt2 (evaluated here): 6.5000" in fig.axes[0].get_legend_handles_labels()[1]
    assert [format_tokens(n) for n in (0, 512, 50_000, 1_500_000, 1e6, 10e9)] == [
        "0",
        "512",
        "50K",
        "1.5M",
        "1M",
        "10B",
    ]
