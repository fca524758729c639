"""The run's logs: metrics.jsonl (one strict-JSON line per optimizer step and per evaluation, `RunFolder`),
TensorBoard and Weights & Biases through accelerate's trackers, the progress bar's line, and the model-FLOPs
utilisation (MFU) of a step."""

from __future__ import annotations

import math
import secrets

from ..base.atomic_io import write_atomic
from ..base.config import TrainConfig
from ..base.run_folder import TRACKER_NAMES, RunFolder


def log_to_trackers(accelerator, row: dict) -> None:
    """A metrics.jsonl row ({"step": ..., name: value}) to the trackers, under their names (TRACKER_NAMES)."""
    values = {TRACKER_NAMES.get(k, k): v for k, v in row.items() if k != "step"}
    accelerator.log(values, step=row["step"])


def tracker_config(cfg: TrainConfig) -> dict:
    """The config flattened to `section.field` scalars (TensorBoard's hparams accept no lists or None)."""
    flat = {}
    for section, fields in cfg.to_dict().items():
        for name, value in fields.items():
            flat[f"{section}.{name}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def tracker_init_kwargs(cfg: TrainConfig, folder: RunFolder, step: int) -> dict:
    """`init_trackers` arguments so that a resumed run continues its logs rather than repeating steps.

    TensorBoard: `purge_step` hides the events a crashed run logged after the checkpoint we resume from (step; 0
    for a start before any checkpoint), as metrics.jsonl drops its lines. Weights & Biases: the run id is kept in
    the run folder and passed back with resume="allow", so a resumed training continues the same W&B run.
    """
    kwargs = {"tensorboard": {"purge_step": step + 1}}
    trackers = {t.strip() for t in cfg.run.log_with.split(",")}
    if trackers & {"wandb", "all"}:
        if not folder.wandb_id.is_file():
            write_atomic(folder.wandb_id, secrets.token_hex(8) + "\n")
        run_id = folder.wandb_id.read_text().strip()
        kwargs["wandb"] = {"name": folder.root.name, "id": run_id, "resume": "allow"}
    return kwargs


def progress_line(row: dict) -> str:
    """The progress bar's postfix for one metrics row."""
    line = f"loss {row['loss']:.4f} lr {row['lr']:.2e} gnorm {row['grad_norm']:.2f} {row['step_time_ms']:.0f}ms "
    line += f"{row['tokens_per_sec'] / 1e3:.1f}k tok/s"
    return line + (f" mfu {row['mfu']:.1%}" if "mfu" in row else "")


class StepLog:
    """One optimizer step's metrics: a metrics.jsonl line, the trackers (TensorBoard, W&B), the progress bar."""

    def __init__(self, cfg: TrainConfig, folder: RunFolder, accelerator, model, bar, line: int = 1):
        from modeling_gpt2_repro import estimate_flops_per_token

        from ..base.machine import peak_flops

        self.folder, self.accelerator, self.bar = folder, accelerator, bar
        self.line = line
        self.batch_tokens = cfg.data.total_batch_tokens
        self.flops_per_token = estimate_flops_per_token(model.config, cfg.data.seq_len)
        self.peak = peak_flops(cfg.run.peak_tflops, accelerator.device)

    def __call__(self, step: int, tokens_seen: int, result, lrs: dict, seconds: float) -> None:
        """Log step `step` (`result`: the step's StepResult, `lrs`: its LRs, `seconds`: its wall-clock time)."""
        tokens_per_sec = self.batch_tokens / seconds
        row = {"step": step, "loss": result.loss, **lrs, "grad_norm": result.grad_norm}
        row |= {"tokens_per_sec": tokens_per_sec, "step_time_ms": seconds * 1000, "tokens": tokens_seen}
        step_mfu = mfu(self.flops_per_token, tokens_per_sec, self.peak, self.accelerator.num_processes)
        row |= {} if math.isnan(step_mfu) else {"mfu": step_mfu}
        row |= {"skipped": True} if result.skipped else {}
        row |= {"line": self.line} if self.line > 1 else {}  # absent: line 1 (a run never resumed from an older one)
        log_to_trackers(self.accelerator, {**row, "line": self.line})
        if self.accelerator.is_main_process:
            self.folder.append_metrics(row)
            self.bar.set_postfix_str(progress_line(row), refresh=False)
            self.bar.update(1)


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops_per_device: float | None, devices: int) -> float:
    """Model FLOPs utilisation in [0, 1]; NaN when the peak is unknown (CPU, an unlisted GPU)."""
    if not peak_flops_per_device:
        return float("nan")
    return flops_per_token * tokens_per_sec / (peak_flops_per_device * devices)
