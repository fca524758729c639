"""What an evaluation reports: the comparison table and its notes, the model card's evaluation section, and the
plot of a training run's curves against OpenAI's GPT-2."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ..base.atomic_io import atomic_write
from ..base.published import BUILD_NANOGPT_VAL_TOKENS, GPT2_124M, GPT3_124M, HELLASWAG_VAL_SIZE
from ..data.shards import manifest_source
from ..publishing.cards import update_model_card

logger = logging.getLogger(__name__)


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_table(results: dict) -> str:
    """Markdown table: this model, the compared model (evaluated here or its published figures), GPT-2, GPT-3, each
    validation loss with the number of tokens it averages over."""
    tokens = f"{results['val_tokens']:,}" if results.get("val_tokens") else "-"
    rows = [(f"this model (`{results['model']}`)", results, tokens)]
    cmp = results.get("compare")
    if cmp is not None and cmp["evaluated"]:  # otherwise the published rows below stand in for it
        rows.append((f"`{cmp['model']}`, evaluated here on the same data", cmp, tokens))
    published = {"hellaswag_examples": HELLASWAG_VAL_SIZE}
    gpt2_tokens = f"{BUILD_NANOGPT_VAL_TOKENS:,} of FineWeb-Edu sample-10BT"
    rows.append(("OpenAI GPT-2 124M, published", {**GPT2_124M, **published}, gpt2_tokens))
    rows.append(("OpenAI GPT-3 124M, published", {**GPT3_124M, **published}, "-"))
    lines = [
        "| model | val loss | val tokens | HellaSwag acc_norm | HellaSwag acc | HellaSwag examples |",
        "|---|---|---|---|---|---|",
    ]
    for name, r, n_tokens in rows:
        n = r.get("hellaswag_examples") or "-"
        lines.append(
            f"| {name} | {_fmt(r.get('val_loss'))} | {n_tokens} | {_fmt(r.get('hellaswag_acc_norm'))} | "
            f"{_fmt(r.get('hellaswag_acc'))} | {n} |"
        )
    return "\n".join(lines)


def comparison_notes(results: dict) -> list[str]:
    notes = []
    if results["val_loss"] is not None:
        data = f" of {results['val_data']}" if results.get("val_data") else ""
        notes.append(
            f"Validation loss over the first {results['val_tokens']:,} tokens{data}, in windows of "
            f"{results['seq_len']}. The published GPT-2 figure is over {BUILD_NANOGPT_VAL_TOKENS:,} tokens of the "
            "FineWeb-Edu sample-10BT val shard in windows of 1,024: comparable only on that data."
        )
        notes.extend(_run_note(results))
    if results.get("val_tokens_asked"):
        notes.append(
            f"The validation split holds fewer tokens than --val_tokens {results['val_tokens_asked']:,} asked for: "
            f"all of it was scored ({results['val_tokens']:,} tokens), so the figure is not comparable with the "
            f"published one ({BUILD_NANOGPT_VAL_TOKENS:,} tokens)."
        )
    n = results["hellaswag_examples"]
    if 0 < n < HELLASWAG_VAL_SIZE:
        notes.append(f"HellaSwag on {n} of the {HELLASWAG_VAL_SIZE:,} validation examples; published figures use all.")
    cmp = results.get("compare")
    if cmp is not None and not cmp["evaluated"]:
        notes.append(f"`{cmp['model']}` could not be loaded here ({cmp['reason']}): compare with the published rows.")
    return notes


def _run_note(results: dict) -> list[str]:
    """How this validation loss relates to the one the training run measured itself (its card's "Evaluation
    during training"), when the model is one of its checkpoints or exports."""
    run = results.get("run_eval")
    if not run or run.get("val_loss") is None:
        return []
    theirs = f"{run['val_loss']:.4f} at step {run['val_step']:,}" if run.get("val_step") is not None else "-"
    if run["same_tokens"]:
        return [f"These are the tokens the training run evaluated: its own figure was {theirs}."]
    return [
        f"The training run evaluated other tokens (the first {run['val_tokens']:,} of its validation data, windows "
        f"of {run['seq_len']}): its {theirs} averages over other text, so the two figures differ."
    ]


def evaluation_section(results: dict) -> str:
    """The model card's "Evaluation results" section (markdown): the comparison table and its notes."""
    notes = "".join(f"\n- {n}" for n in comparison_notes(results))
    return (
        f"## Evaluation results\n\nMeasured with `python evaluate_gpt2.py` (gpt2-repro) on {results['date']}.\n\n"
        f"{comparison_table(results)}\n{notes}"
    )


def write_results_to_card(folder: str | os.PathLike, results: dict, data_source: dict | None = None) -> Path:
    """The evaluation section into folder/README.md, and into its model-index: the validation loss (on the data
    `data_source` names, as data_prep.py's manifest records it) and HellaSwag when all of it was scored. Models
    are named without a path of this machine (`public_name`)."""
    complete = results["hellaswag_examples"] == HELLASWAG_VAL_SIZE
    hellaswag = {m: results[f"hellaswag_{m}"] for m in ("acc_norm", "acc")} if complete else None
    val_loss = None
    if results["val_loss"] is not None:
        val_loss = {"value": results["val_loss"], "tokens": results["val_tokens"], "data_source": data_source}
    public = {**results, "model": public_name(results["model"])}
    if results.get("compare"):
        public["compare"] = {**results["compare"], "model": public_name(results["compare"]["model"])}
    return update_model_card(folder, evaluation_section(public), hellaswag, val_loss)


def public_name(model: str) -> str:
    """How shared results (the JSON, the model card) name a model: a Hub id as it is, a local folder by its last
    component (`export`, `step_00001000`), never a path of this machine."""
    return Path(model).name if Path(model).exists() else model


# ------------------------------------------------------------------------------------------------------ plots


def find_metrics_log(log_dir: str | None, model: str) -> Path | None:
    """metrics.jsonl of the training run: --log_dir (folder or file), else in the model folder or 2 levels up."""
    if log_dir:
        candidates = [Path(log_dir)]
    elif Path(model).is_dir():
        folder = Path(model).resolve()
        candidates = [folder, *list(folder.parents)[:2]]
    else:
        return None
    for c in candidates:
        f = c if c.is_file() else c / "metrics.jsonl"
        if f.is_file():
            return f
    return None


def read_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """{"loss", "val_loss", "hellaswag_acc_norm": [(tokens, value)]} from a training run's metrics.jsonl.

    Training lines carry their tokens; an evaluation line (step, values) is placed at the tokens of its step, or at
    step x tokens per step when that step's line is missing. Lines that are not JSON objects (a run still writing
    its last line) and values that are not finite numbers (a skipped step) are left out.
    """
    rows = []
    for line in Path(metrics_file).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    tokens_at = {r["step"]: r["tokens"] for r in rows if isinstance(r.get("tokens"), int)}
    per_step = next((t / s for s, t in tokens_at.items() if s), 1.0)
    curves = {"loss": [], "val_loss": [], "hellaswag_acc_norm": []}
    for row in rows:
        tokens = tokens_at.get(row["step"], row["step"] * per_step)
        for key, points in curves.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                points.append((tokens, float(value)))
    return curves


def smoothed(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start): the training loss's trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def format_tokens(value: float, _position=None) -> str:
    """A token count as an axis label: 0, 500, 50K, 1.5M, 10B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def run_data_source(metrics_file: Path) -> dict | None:
    """The data a training run trained and evaluated on, from the config.yaml beside its metrics.jsonl: a stream's
    identity, or what data_prep.py's manifest of its shards records (None where it cannot be told)."""
    import yaml

    try:
        config = yaml.safe_load((Path(metrics_file).parent / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        return None
    if data.get("dataset"):
        return {"dataset": data["dataset"], "name": data.get("dataset_name"), "split": data.get("dataset_split")}
    return manifest_source(data.get("data_dir")) if data.get("data_dir") else None


def plot_training_curves(metrics_file: Path, png: str | os.PathLike, results: dict) -> Path | None:
    """The PNG of `training_curves_figure`; None (with a warning) when metrics.jsonl holds no curve."""
    fig = training_curves_figure(metrics_file, results)
    if fig is None:
        logger.warning("No training or evaluation lines in %s: no plot.", metrics_file)
        return None
    png = Path(png)
    with atomic_write(png) as f:
        fig.savefig(f, format="png", dpi=100)
    return png


def training_curves_figure(metrics_file: Path, results: dict):
    """The public reproductions' figure (a matplotlib Figure, None without data): training loss (raw and smoothed)
    and validation loss against tokens, and HellaSwag beside GPT-2 and GPT-3 124M; a panel without data says why.

    A reference validation loss is drawn only where it was measured on the run's own validation data: the compared
    model when evaluate_gpt2.py scored it on the run's data, else OpenAI GPT-2 124M's published figure when the run's
    data is its FineWeb-Edu sample-10BT; otherwise the panel says why there is none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import FuncFormatter

    from ..publishing.cards import dataset_short_name, is_gpt2_val_data

    curves = read_curves(metrics_file)
    if not curves["loss"] and not curves["val_loss"]:
        return None
    cmp, source = results.get("compare") or {}, run_data_source(metrics_file)
    on_run_data = bool((results.get("run_eval") or {}).get("same_data"))

    fig = Figure(figsize=(13, 4.8))
    FigureCanvasAgg(fig)
    ax_loss, ax_hs = fig.subplots(1, 2)
    if curves["loss"]:
        tokens, loss = zip(*curves["loss"], strict=True)
        window = max(1, len(loss) // 50)  # a short run's curve is drawn as it is
        ax_loss.plot(tokens, loss, color="tab:blue", alpha=0.25 if window > 1 else 1.0, lw=0.8, label="training loss")
        if window > 1:
            label = f"training loss ({window}-step mean)"
            ax_loss.plot(tokens, smoothed(list(loss), window), color="tab:blue", label=label)
    if curves["val_loss"]:
        tokens, val = zip(*curves["val_loss"], strict=True)
        ax_loss.plot(tokens, val, "o-", color="tab:orange", ms=3, label="validation loss")
    if on_run_data and cmp.get("evaluated") and cmp.get("val_loss") is not None:
        label = f"{cmp['model']} (evaluated here): {cmp['val_loss']:.4f}"
        ax_loss.axhline(cmp["val_loss"], color="tab:red", ls="--", label=label)
    elif is_gpt2_val_data(source):
        value = GPT2_124M["val_loss"]
        ax_loss.axhline(value, color="tab:red", ls="--", label=f"OpenAI GPT-2 124M (published): {value:.4f}")
    else:
        data = f"this run's data is {dataset_short_name(source)}" if source else "this run's data is not known"
        why = f"OpenAI GPT-2 124M's published {GPT2_124M['val_loss']} is on FineWeb-Edu sample-10BT;\n{data}"
        ax_loss.text(0.98, 0.97, why, ha="right", va="top", transform=ax_loss.transAxes, fontsize=8, color="0.35")
    ax_loss.set(xlabel="training tokens", ylabel="loss (nats per token)", title="loss")
    ax_loss.legend(fontsize=8, loc="lower left")
    if curves["hellaswag_acc_norm"]:
        tokens, acc = zip(*curves["hellaswag_acc_norm"], strict=True)
        ax_hs.plot(tokens, acc, "o-", color="tab:orange", ms=3, label="this run")
        if cmp.get("evaluated") and cmp.get("hellaswag_acc_norm") is not None:
            value, name = cmp["hellaswag_acc_norm"], f"{cmp['model']} (evaluated here)"
        else:
            value, name = GPT2_124M["hellaswag_acc_norm"], "OpenAI GPT-2 124M (published)"
        ax_hs.axhline(value, color="tab:red", ls="--", label=f"{name}: {value:.4f}")
        ax_hs.axhline(GPT3_124M["hellaswag_acc_norm"], color="tab:green", ls="--", label="OpenAI GPT-3 124M: 0.337")
        ax_hs.legend(fontsize=8)
        ax_hs.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    else:
        why = (
            "HellaSwag was not scored during this run\n(--hellaswag false, or offline without --hellaswag_file):\n"
            "evaluate_gpt2.py --hellaswag_file scores the export"
        )
        ax_hs.text(0.5, 0.5, why, ha="center", va="center", transform=ax_hs.transAxes, color="0.3")
        ax_hs.set(xticks=[], yticks=[])
    ax_hs.set(xlabel="training tokens", ylabel="acc_norm", title="HellaSwag")
    ax_loss.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    for ax in (ax_loss, ax_hs):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['model']}: {Path(metrics_file).parent.name}/{Path(metrics_file).name}")
    fig.tight_layout()
    return fig
