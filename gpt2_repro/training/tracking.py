"""The run's logs: metrics.jsonl (one strict-JSON line per optimizer step and per evaluation, `RunFolder`),
TensorBoard and Weights & Biases through accelerate's trackers, the progress shown on screen or in a log file, and the
model-FLOPs utilisation (MFU) of a step."""

from __future__ import annotations

import math
import secrets
import sys
import time

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


# The hparams table's metrics: TensorBoard reads each run's own scalars of these names beside its hyperparameters.
HPARAMS_METRICS = ("eval/loss", "eval/hellaswag_acc_norm")


def start_trackers(accelerator, cfg: TrainConfig, folder: RunFolder, step: int) -> None:
    """accelerate's trackers, started and given the run's config (`tracker_config`).

    TensorBoard gets it in its own run, beside the scalars: the hparams plugin's summaries (the HPARAMS tab) and the
    config as text. accelerate's `store_init_configuration` is not used for it: `SummaryWriter.add_hparams` writes
    into a new sub-folder named by the time, and accelerate adds another for hparams.yml, so every start would add
    two runs to TensorBoard's list, one of them with no scalars. The other trackers (W&B) get it from accelerate.
    """
    init_kwargs = tracker_init_kwargs(cfg, folder, step) if accelerator.is_main_process else {}
    accelerator.init_trackers(cfg.run.project_name, config=None, init_kwargs=init_kwargs)
    config = tracker_config(cfg)
    for tracker in accelerator.trackers:
        if tracker.name != "tensorboard":
            tracker.store_init_configuration(config)
        elif accelerator.is_main_process:  # the writer exists on the main process only
            write_hparams(tracker.writer, config, cfg)


def write_hparams(writer, config: dict, cfg: TrainConfig) -> None:
    """The hparams plugin's summaries (what `add_hparams` writes into its sub-folder) into `writer`'s own run."""
    from torch.utils.tensorboard.summary import hparams

    from ..base.cli import to_yaml

    for summary in hparams(config, dict.fromkeys(HPARAMS_METRICS, 0.0)):  # experiment, session start and end
        writer.file_writer.add_summary(summary)
    writer.add_text("config", "```yaml\n" + to_yaml(cfg) + "```")  # TEXT: the run's config.yaml
    writer.flush()


def progress_line(row: dict) -> str:
    """A step's numbers as the progress bar's postfix or a progress line shows them."""
    line = f"loss {row['loss']:.4f} lr {row['lr']:.2e} gnorm {row['grad_norm']:.2f} {row['step_time_ms']:.0f}ms "
    line += f"{row['tokens_per_sec'] / 1e3:.1f}k tok/s"
    return line + (f" mfu {row['mfu']:.1%}" if "mfu" in row else "")


def say(message: str) -> None:
    """Print a message on lines of its own (above the progress bar when one is drawn), flushed: a log file shows it
    when it happens."""
    from tqdm.auto import tqdm

    tqdm.write(message)
    sys.stdout.flush()


class Progress:
    """The steps as they go by, on the main process.

    On a terminal: tqdm's bar, the newest step's `progress_line` beside it. Elsewhere (a file, nohup, Slurm, a pipe)
    a bar is one endless line of carriage returns with the messages glued to its end, so the steps are plain lines
    instead: the first step, then one every `interval` seconds, and the last. Both go to stdout, where the messages
    (`say`) go: `accelerate launch` passes stdout through but pipes stderr, so stderr is never a terminal under it.
    """

    def __init__(self, total: int, initial: int, interval: float, enabled: bool = True, stream=None):
        stream = sys.stdout if stream is None else stream
        self.total, self.interval, self.enabled = total, interval, enabled
        self.bar = None
        if enabled and stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=stream)
        self.started, self.first_step, self.last_line = time.monotonic(), initial, None

    def __call__(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(progress_line(row), refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.last_line is None or step >= self.total or now - self.last_line >= self.interval:
            self.last_line = now
            say(f"step {step:,}/{self.total:,}: {progress_line(row)} | {self._times(step, now)}")

    def _times(self, step: int, now: float) -> str:
        """Elapsed since this start, and the time left at this start's pace so far."""
        from tqdm import tqdm

        elapsed, done = now - self.started, step - self.first_step
        left = elapsed / done * (self.total - step) if done else 0.0
        return f"{tqdm.format_interval(elapsed)} elapsed, {tqdm.format_interval(left)} left"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepLog:
    """One optimizer step's metrics: a metrics.jsonl line, the trackers (TensorBoard, W&B), the progress."""

    def __init__(self, cfg: TrainConfig, folder: RunFolder, accelerator, model, progress: Progress, line: int = 1):
        from modeling_gpt2_repro import estimate_flops_per_token

        from ..base.machine import peak_flops

        self.folder, self.accelerator, self.progress = folder, accelerator, progress
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
        log_to_trackers(self.accelerator, row)  # train/line from line 2 on, as in metrics.jsonl
        if self.accelerator.is_main_process:
            self.folder.append_metrics(row)
            self.progress(step, row)


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops_per_device: float | None, devices: int) -> float:
    """Model FLOPs utilisation in [0, 1]; NaN when the peak is unknown (CPU, an unlisted GPU)."""
    if not peak_flops_per_device:
        return float("nan")
    return flops_per_token * tokens_per_sec / (peak_flops_per_device * devices)
