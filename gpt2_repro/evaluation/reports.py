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
    """Markdown table: this model, the compared model (evaluated here or its published figures), GPT-2, GPT-3."""
    rows = [(f"this model (`{results['model']}`)", results)]
    cmp = results.get("compare")
    if cmp is not None and cmp["evaluated"]:  # otherwise the published rows below stand in for it
        rows.append((f"`{cmp['model']}`, evaluated here on the same data", cmp))
    rows.append(("OpenAI GPT-2 124M, published", {**GPT2_124M, "hellaswag_examples": HELLASWAG_VAL_SIZE}))
    rows.append(("OpenAI GPT-3 124M, published", {**GPT3_124M, "hellaswag_examples": HELLASWAG_VAL_SIZE}))
    lines = ["| model | val loss | HellaSwag acc_norm | HellaSwag acc | HellaSwag examples |", "|---|---|---|---|---|"]
    for name, r in rows:
        n = r.get("hellaswag_examples") or "-"
        lines.append(
            f"| {name} | {_fmt(r.get('val_loss'))} | {_fmt(r.get('hellaswag_acc_norm'))} | "
            f"{_fmt(r.get('hellaswag_acc'))} | {n} |"
        )
    return "\n".join(lines)


def comparison_notes(results: dict) -> list[str]:
    notes = []
    if results["val_loss"] is not None:
        notes.append(
            f"Validation loss over {results['val_tokens']:,} tokens in sequences of {results['seq_len']}. "
            f"The published GPT-2 figure is on the FineWeb-Edu sample-10BT val shard "
            f"({BUILD_NANOGPT_VAL_TOKENS:,} tokens of 1024): "
            "comparable only on that data."
        )
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


def evaluation_section(results: dict) -> str:
    """The model card's "Evaluation results" section (markdown): the comparison table and its notes."""
    notes = "".join(f"\n- {n}" for n in comparison_notes(results))
    return (
        f"## Evaluation results\n\nMeasured with `python evaluate_gpt2.py` (gpt2-repro) on {results['date']}.\n\n"
        f"{comparison_table(results)}\n{notes}"
    )


def write_results_to_card(folder: str | os.PathLike, results: dict, data_dir: str | None = None) -> Path:
    """The evaluation section into folder/README.md, and into its model-index: the validation loss (on the data
    that `data_dir`'s manifest names) and HellaSwag when all of it was scored."""
    complete = results["hellaswag_examples"] == HELLASWAG_VAL_SIZE
    hellaswag = {m: results[f"hellaswag_{m}"] for m in ("acc_norm", "acc")} if complete else None
    val_loss = None
    if results["val_loss"] is not None:
        val_loss = {"value": results["val_loss"], "tokens": results["val_tokens"]}
        val_loss["data_source"] = manifest_source(data_dir)
    # The card is meant to be shared: local model folders by their name only, never a path of this machine.
    public = {**results, "model": _card_name(results["model"])}
    if results.get("compare"):
        public["compare"] = {**results["compare"], "model": _card_name(results["compare"]["model"])}
    return update_model_card(folder, evaluation_section(public), hellaswag, val_loss)


def _card_name(name: str) -> str:
    """A Hub id as it is; a local folder by its last component (`export`, `step_00001000`)."""
    return Path(name).name if Path(name).exists() else name


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


def plot_training_curves(metrics_file: Path, png: str | os.PathLike, results: dict) -> Path | None:
    """The public reproductions' figure: training loss (raw and smoothed) and validation loss against tokens beside
    OpenAI's GPT-2 124M, and HellaSwag beside GPT-2 and GPT-3 124M; a panel without data says why."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    curves = read_curves(metrics_file)
    if not curves["loss"] and not curves["val_loss"]:
        logger.warning("No training or evaluation lines in %s: no plot.", metrics_file)
        return None
    cmp = results.get("compare") or {}

    def baseline(key):  # the compared model evaluated here on the same data, else the published figure
        if cmp.get("evaluated") and cmp.get(key) is not None:
            return cmp[key], f"{cmp['model']} (evaluated here)"
        return GPT2_124M[key], "OpenAI GPT-2 124M (published)"

    fig = Figure(figsize=(13, 4.8))
    ax_loss, ax_hs = fig.subplots(1, 2)
    if curves["loss"]:
        tokens, loss = zip(*curves["loss"], strict=True)
        ax_loss.plot(tokens, loss, color="tab:blue", alpha=0.25, lw=0.8, label="training loss")
        window = max(1, len(loss) // 50)
        ax_loss.plot(
            tokens, smoothed(list(loss), window), color="tab:blue", label=f"training loss ({window}-step mean)"
        )
    if curves["val_loss"]:
        tokens, val = zip(*curves["val_loss"], strict=True)
        ax_loss.plot(tokens, val, "o-", color="tab:orange", ms=3, label="validation loss")
    value, name = baseline("val_loss")
    ax_loss.axhline(value, color="tab:red", ls="--", label=f"{name}: {value:.4f}")
    ax_loss.set(xlabel="training tokens", ylabel="loss (nats per token)", title="loss")
    ax_loss.legend(fontsize=8)
    if curves["hellaswag_acc_norm"]:
        tokens, acc = zip(*curves["hellaswag_acc_norm"], strict=True)
        ax_hs.plot(tokens, acc, "o-", color="tab:orange", ms=3, label="this run")
        value, name = baseline("hellaswag_acc_norm")
        ax_hs.axhline(value, color="tab:red", ls="--", label=f"{name}: {value:.4f}")
        ax_hs.axhline(GPT3_124M["hellaswag_acc_norm"], color="tab:green", ls="--", label="OpenAI GPT-3 124M: 0.337")
        ax_hs.legend(fontsize=8)
    else:
        why = (
            "HellaSwag was not scored during this run\n(--hellaswag false, or offline without --hellaswag_file):\n"
            "evaluate_gpt2.py --hellaswag_file scores the export"
        )
        ax_hs.text(0.5, 0.5, why, ha="center", va="center", transform=ax_hs.transAxes, color="0.3")
        ax_hs.set(xticks=[], yticks=[])
    ax_hs.set(xlabel="training tokens", ylabel="acc_norm", title="HellaSwag")
    for ax in (ax_loss, ax_hs):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['model']}: {Path(metrics_file).parent.name}/{Path(metrics_file).name}")
    fig.tight_layout()
    png = Path(png)
    with atomic_write(png) as f:
        fig.savefig(f, format="png", dpi=100)
    return png
