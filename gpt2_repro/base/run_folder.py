"""The run folder (`--output_dir`): the one object that names what it holds, and its own bookkeeping.

    checkpoints/     complete training states (checkpointing/), each a model folder too
    checkpoint-N     a link to the newest of them, under the name transformers' Trainer gives its checkpoints
    export/          the newest checkpoint's model (hard links), export-gpt2/ the same as a stock GPT2LMHeadModel
    metrics.jsonl    one strict-JSON line per optimizer step and per evaluation
    config.yaml      the resolved config of the newest attempt (re-runnable with --config)
    run_info.json    what ran where (versions, commit, hardware), with the history of attempts
    logs/            TensorBoard; wandb_run_id: the Weights & Biases run a resume continues
    .lock            one run at a time (lock.RunLock)

- `RunFolder.claim`: the folder's lock, held by the main process for the whole run.
- `RunFolder.room_problem`: whether the disk can hold a checkpoint (free space, the file-size limit).
- `RunFolder.append_metrics` / `truncate_metrics`: metrics.jsonl, whose lines after a resumed step are redone;
  `log_history`: its lines as transformers' TrainerState keeps them (Trainer's names: `trainer_log_entry`).
- `RunFolder.record_run` / `record_attempt`: config.yaml and run_info.json, written once every check has passed;
  run_info.json keeps the facts of the newest attempt at its top level plus `attempts`, one entry per start or
  resume with what changed since the previous one.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import socket
import time
from pathlib import Path

from .atomic_io import strict_json, write_atomic, write_json_atomic
from .cli import flat_options
from .errors import RunError, describe_environment_error
from .lock import RunLock

STOCK_EXPORT = "export-gpt2"  # the stock GPT2LMHeadModel: in the run folder, and inside each checkpoint

# metrics.jsonl's names -> the trackers' (TensorBoard, W&B): the Trainer's namespaces and, where it has one, its name,
# so dashboards that overlay Trainer runs line up.
TRACKER_NAMES = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "muon_lr": "train/muon_learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens": "train/num_input_tokens_seen",
    "tokens_per_sec": "train/tokens_per_second",
    "step_time_ms": "train/step_time_ms",
    "mfu": "train/mfu",
    "skipped": "train/skipped",
    "line": "train/line",
    "val_loss": "eval/loss",
    "hellaswag_acc_norm": "eval/hellaswag_acc_norm",
    "hellaswag_acc": "eval/hellaswag_acc",
}


def trainer_log_entry(row: dict) -> dict:
    """A metrics.jsonl row as an entry of transformers' `TrainerState.log_history`: Trainer's names, as its own logs
    carry them before a tracker adds the namespace (`loss`, `learning_rate`, `grad_norm`, `num_input_tokens_seen`;
    an evaluation's `eval_loss`, `eval_hellaswag_acc_norm`), and `step`."""
    named = {k: TRACKER_NAMES.get(k, k) for k in row}
    return {name.replace("train/", "", 1).replace("eval/", "eval_", 1): row[k] for k, name in named.items()}


class RunFolder:
    """`--output_dir` and the paths of what a run keeps there."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.export = self.root / "export"
        self.stock_export = self.root / STOCK_EXPORT
        self.metrics = self.root / "metrics.jsonl"
        self.config = self.root / "config.yaml"
        self.run_info = self.root / "run_info.json"
        self.logs = self.root / "logs"
        self.wandb_id = self.root / "wandb_run_id"

    def __str__(self) -> str:
        return str(self.root)

    def claim(self, log) -> RunLock:
        """Lock the folder for the whole run (main process); a folder in use, read-only or not a folder is refused
        at once."""
        lock = RunLock(self.root)
        try:
            lock.acquire()
        except OSError as e:
            described = describe_environment_error(e)
            if described is None:
                raise
            raise RunError(f"cannot use --output_dir {self.root}: {described}") from None
        if lock.warning:
            log(lock.warning)
        return lock

    # -------------------------------------------------------------------------------------------------- room

    def check_room(self, need: int, what: str, checkpoint: int | None = None) -> None:
        """Refuse up front what the disk cannot hold (room_problem)."""
        problem = self.room_problem(need, what, checkpoint)
        if problem:
            raise RunError(problem)

    def room_problem(self, need: int, what: str, checkpoint: int | None = None) -> str | None:
        """What keeps the disk from holding `need` more bytes (checkpoints of `checkpoint` bytes each, one when it is
        None), whose largest files are 2/5 of a checkpoint (the optimizer state): too little free space, or a
        file-size limit; None when it fits."""
        checkpoint = need if checkpoint is None else checkpoint
        free = shutil.disk_usage(self.root).free
        if free < need:
            return (
                f"{self.root} has {free / 1e9:.2f} GB free, but {what} needs about {need / 1e9:.2f} GB. Free some "
                "space or choose --output_dir on another disk."
            )
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and limit < checkpoint // 2:  # with a margin over the 2/5
            return (
                f"the file-size limit (ulimit -f) is {limit:,} bytes, but a checkpoint writes files of up to about "
                f"{checkpoint * 2 // 5:,} bytes. Raise it (ulimit -f unlimited) before training."
            )
        return None

    # ----------------------------------------------------------------------------------------------- metrics

    def append_metrics(self, row: dict) -> None:
        """One strict-JSON line (a non-finite number becomes null). Reopened per line: a killed run loses at most
        the line being written."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(strict_json(row)) + "\n")

    def metrics_rows(self) -> list[str]:
        """metrics.jsonl's lines, without a half-written last one ([] when there is none)."""
        if not self.metrics.is_file():
            return []
        return [row for row in self.metrics.read_text().splitlines() if step_of(row) is not None]

    def truncate_metrics(self, step: int, keep_evaluation: bool = True) -> None:
        """Drop the lines of steps after `step` (run after the checkpoint a start resumes from: they are redone), and
        with keep_evaluation=False the evaluation line of `step` itself (it is redone too)."""

        def kept(row: str) -> bool:
            at = step_of(row)
            return at < step or (at == step and (keep_evaluation or "val_loss" not in json.loads(row)))

        if self.metrics.is_file():
            write_atomic(self.metrics, "".join(row + "\n" for row in self.metrics_rows() if kept(row)))

    def log_history(self, step: int) -> list[dict]:
        """metrics.jsonl's lines up to `step` (every training step and evaluation of the run's current line: a resume
        drops the lines it redoes, a new line moves the old one's away) as Trainer's `log_history`."""
        return [trainer_log_entry(json.loads(row)) for row in self.metrics_rows() if step_of(row) <= step]

    # ------------------------------------------------------------------------------------------ attempt history

    def read_previous(self) -> tuple[dict | None, dict | None]:
        """(config.yaml, run_info.json) of the previous attempt, None where absent or unreadable."""
        import yaml

        config = info = None
        with contextlib.suppress(OSError, yaml.YAMLError):
            config = yaml.safe_load(self.config.read_text())
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(self.run_info.read_text())
        return (config if isinstance(config, dict) else None), (info if isinstance(info, dict) else None)

    def record_run(self, cfg, accelerator, log, facts: dict | None = None, **attempt) -> None:
        """Save the resolved config and the facts of this run (versions, commit, hardware, batch, and `facts`: what
        the trainer found in force, e.g. whether the model checkpoints its activations), and print the few that
        matter at a glance (`summary`): the files hold the rest.

        Called once every check has passed, so a refused run leaves the folder as it was. run_info.json keeps a
        history: `attempt` (start step, checkpoint resumed from) and what changed since the previous attempt are
        appended.
        """
        from .config import save_config
        from .machine import collect_run_info

        if not accelerator.is_main_process:
            return
        info = collect_run_info(
            {
                "num_processes": accelerator.num_processes,
                "grad_accum_steps": accelerator.gradient_accumulation_steps,
                "device": str(accelerator.device),
                "mixed_precision": accelerator.mixed_precision,
                "compile": str(accelerator.state.dynamo_plugin.backend.value),
                "optimizer_fused": accelerator.device.type == "cuda",
                **(facts or {}),
            }
        )
        previous_config, previous_info = self.read_previous()
        info = record_attempt(info, previous_info, previous_config, cfg.to_dict(), **attempt)
        save_config(cfg, self.config)
        write_json_atomic(self.run_info, info)
        for line in self.summary(cfg, info):
            log(line)
        if info["attempts"][-1]["changed"]:
            log(f"changed since the previous attempt: {info['attempts'][-1]['changed']}")

    def summary(self, cfg, info: dict) -> list[str]:
        """What a run prints before its first step: the model, the batch, the data, where the run folder is (the
        full config and run facts are in config.yaml and run_info.json, which it names)."""
        from .config import parameter_count

        model, data, ev, processes = cfg.model, cfg.data, cfg.eval, info["num_processes"]
        precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(
            info["mixed_precision"], info["mixed_precision"]
        )
        compiled = "not compiled" if info["compile"].upper() == "NO" else f"compiled ({info['compile'].lower()})"
        tokens = data.total_batch_tokens * cfg.optim.max_steps
        if data.dataset is None:
            source = f"token shards in {data.data_dir}"
        else:
            config = f" ({data.dataset_name})" if data.dataset_name else ""
            source = (
                f"{data.dataset}{config}, tokenized as it streams; its first {data.stream_val_tokens + 1:,} tokens "
                "are the validation set"
            )
        trackers = {t.strip() for t in cfg.run.log_with.split(",")}
        board = f"; tensorboard --logdir {self.logs}" if trackers & {"tensorboard", "all"} else ""
        plural = "es" if processes > 1 else ""
        return [
            f"model: GPT-2 of {parameter_count(model) / 1e6:,.1f}M parameters ({model.n_layer} layers, "
            f"{model.n_head} heads, width {model.n_embd}, context {model.n_positions}) on {info['device']}, "
            f"{precision}, {compiled}",
            f"batch: {data.total_batch_tokens:,} tokens/step = {data.micro_batch_size} x {data.seq_len} x "
            f"{processes} process{plural} x {info['grad_accum_steps']} accumulation steps; {cfg.optim.max_steps:,} "
            f"steps = {_count(tokens)} tokens",
            f"data: {source}; validation on {ev.val_tokens:,} tokens "
            + (f"every {ev.eval_every:,} steps" if ev.eval_every else "at the end"),
            f"run folder: {self.root} (full config: config.yaml; versions, hardware, attempts: run_info.json{board})",
        ]


def _count(n: int) -> str:
    """A token count the way people say it: 410K, 6.7B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def step_of(row: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line that does not parse (the half-written last line of a
    killed run)."""
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def config_changes(before: dict | None, after: dict) -> dict[str, list]:
    """{option: [before, after]} for every option whose value differs (sectioned or flat configs)."""
    if not before:
        return {}
    old, new = flat_options(before), flat_options(after)
    return {k: [old.get(k), new.get(k)] for k in new if old.get(k) != new.get(k)}


def record_attempt(
    info: dict, previous_info: dict | None, previous_config: dict | None, config: dict, **attempt
) -> dict:
    """run_info.json's new content: this attempt's facts on top, and the history with this attempt appended.

    `attempt` holds what the trainer knows (start step, the checkpoint resumed from, ...); what changed since the
    previous attempt is added: config options, process count, code commit, library versions.
    """
    history = list((previous_info or {}).get("attempts", []))
    if previous_info and not history:  # a run folder from before the history existed
        history.append({"started": None, "git_commit": previous_info.get("git_commit")})
    changed = config_changes(previous_config, config)
    if previous_info:
        for key in ("num_processes", "git_commit"):
            if key in previous_info and previous_info.get(key) != info.get(key):
                changed[key] = [previous_info.get(key), info.get(key)]
        old_versions, new_versions = previous_info.get("versions") or {}, info.get("versions") or {}
        for lib, version in new_versions.items():
            if lib in old_versions and old_versions[lib] != version:
                changed[f"versions.{lib}"] = [old_versions[lib], version]
    entry = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": socket.gethostname(),
        "command": info.get("command"),
        "git_commit": info.get("git_commit"),
        "num_processes": info.get("num_processes"),
        **attempt,
        "changed": changed,
    }
    return {**info, "attempts": [*history, entry]}
