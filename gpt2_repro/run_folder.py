"""The run folder's own bookkeeping: one run at a time (a lock), room for checkpoints, the data it trains on, and
the history of its attempts.

- `claim_run_dir`: the folder's lock (`lock.RunLock`), held by the main process for the whole run.
- `room_problem`: whether the disk can hold a checkpoint (free space, the file-size limit), checked at start-up
  and before each checkpoint.
- `verify_data`: every shard against the SHA-256 that data_prep.py recorded, once per start.
- `record_run` / `record_attempt`: config.yaml and run_info.json, written once every check has passed;
  run_info.json keeps the facts of the newest attempt at its top level plus `attempts`, one entry per start or
  resume with what changed since the previous one.
- `explained_failures`: Ctrl-C and environment failures end with a message that says what can be resumed.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import resource
import shutil
import socket
import time
from pathlib import Path

import yaml

from .atomic_io import write_json_atomic
from .checkpoint import list_checkpoints, resume_hint
from .cli import flat_options
from .config import TrainConfig, save_config
from .errors import ConfigError, DataError, RunError, Stop, describe_environment_error
from .loader import val_windows
from .lock import RunLock
from .run_info import collect_run_info
from .shards import check_shards, finish_command, read_manifest


def is_main_process() -> bool:
    """Whether this is the main process of the launch (RANK 0, or no launcher), known before accelerate starts."""
    return os.environ.get("RANK", "0") == "0"


def claim_run_dir(run_dir: Path, log) -> RunLock:
    """Lock the run folder for the whole run (RunLock, main process); a folder in use, read-only or not a folder is
    refused at once."""
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except OSError as e:
        described = describe_environment_error(e)
        if described is None:
            raise
        raise RunError(f"cannot use --output_dir {run_dir}: {described}") from None
    if lock.warning:
        log(lock.warning)
    return lock


# ------------------------------------------------------------------------------------------------ room


def checkpoint_bytes(n_params: int) -> int:
    """About the disk space of one checkpoint, with a margin: fp32 weights, AdamW's two moments and the stock
    export are 4 x 4 bytes per parameter (export/ is hard links); a fifth more covers tokenizer, cards and code."""
    return 5 * 4 * n_params


def check_room(run_dir: Path, need: int, what: str) -> None:
    """Refuse up front what the disk cannot hold (room_problem)."""
    problem = room_problem(run_dir, need, what)
    if problem:
        raise RunError(problem)


def room_problem(run_dir: Path, need: int, what: str) -> str | None:
    """What keeps the disk from holding `need` bytes (a whole checkpoint) in files of up to 2/5 of that (the
    optimizer state): too little free space, or a file-size limit; None when it fits."""
    free = shutil.disk_usage(run_dir).free
    if free < need:
        return (
            f"{run_dir} has {free / 1e9:.2f} GB free, but {what} needs about {need / 1e9:.2f} GB. Free some "
            "space or choose --output_dir on another disk."
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < need // 2:  # with a margin over the 2/5
        return (
            f"the file-size limit (ulimit -f) is {limit:,} bytes, but {what} writes files of up to about "
            f"{need * 2 // 5:,} bytes. Raise it (ulimit -f unlimited) before training."
        )
    return None


# ------------------------------------------------------------------------------------------------ data


def check_data_dir(cfg: TrainConfig) -> None:
    """Fail before anything starts when there is no prepared data or too little validation data for val_tokens.

    A stream (--dataset) is opened: its id, files and text column are checked; its length is known only once read.
    """
    if cfg.data.dataset is not None:
        from .text_stream import open_text_stream

        data = cfg.data
        open_text_stream(data.dataset, data.dataset_name, data.dataset_split, data.text_column)
        return
    if not glob.glob(cfg.data.data_dir):
        raise ConfigError(
            f"no training shards in data_dir={cfg.data.data_dir!r}. Prepare them first, e.g. "
            f"`python data_prep.py --dataset my_text.txt --output_dir {cfg.data.data_dir}` (see the README), "
            f"or pass --data_dir."
        )
    manifest = read_manifest(cfg.data.data_dir) if Path(cfg.data.data_dir).is_dir() else None
    if manifest is not None and manifest.get("complete") is False:
        done = len(manifest.get("shards", []))
        raise DataError(
            f"{cfg.data.data_dir} is unfinished: data_prep.py stopped after {done} shard(s) (manifest.json says "
            f"complete: false), and the shards still to come would change the data under a run. Finish it first: "
            f"`{finish_command(cfg.data.data_dir, manifest)}`."
        )
    val_windows(cfg.data.data_dir, cfg.data.seq_len, cfg.eval.val_tokens)  # DataError if too short


def verify_data(cfg: TrainConfig, log) -> None:
    """Check every shard against the SHA-256 in the data's manifest.json (data_prep.py wrote it), once per start
    (main process): about 0.25 s per 100M-token shard and core (bench/bench_verify.py)."""
    if not cfg.data.verify_data or cfg.data.dataset is not None or not Path(cfg.data.data_dir).is_dir():
        return  # not asked for; a stream has no shards; a glob or a single file has no manifest to check against
    start = time.perf_counter()
    if check_shards(cfg.data.data_dir):
        log(f"data: every shard matches manifest.json ({time.perf_counter() - start:.1f}s)")
    else:
        log(
            f"warning: {cfg.data.data_dir} has no manifest.json, so its shards cannot be checked against the SHA-256 "
            "data_prep.py records (prepared elsewhere, or the manifest was deleted); --verify_data false says it is "
            "known"
        )


# ------------------------------------------------------------------------------------------ attempt history


def config_changes(before: dict | None, after: dict) -> dict[str, list]:
    """{option: [before, after]} for every option whose value differs (sectioned or flat configs)."""
    if not before:
        return {}
    old, new = flat_options(before), flat_options(after)
    return {k: [old.get(k), new.get(k)] for k in new if old.get(k) != new.get(k)}


def read_previous(run_dir: Path) -> tuple[dict | None, dict | None]:
    """(config.yaml, run_info.json) of the previous attempt in `run_dir`, None where absent or unreadable."""
    config = info = None
    with contextlib.suppress(OSError, yaml.YAMLError):
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((run_dir / "run_info.json").read_text())
    return (config if isinstance(config, dict) else None), (info if isinstance(info, dict) else None)


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


def record_run(cfg: TrainConfig, accelerator, run_dir: Path, log, **attempt) -> None:
    """Print and save the resolved config and the facts of this run (versions, commit, hardware, batch).

    Called once every check has passed, so a refused run leaves the folder as it was. run_info.json keeps a history:
    `attempt` (start step, checkpoint resumed from) and what changed since the previous attempt are appended.
    """
    data, accum = cfg.data, accelerator.gradient_accumulation_steps
    if accelerator.is_main_process:
        info = collect_run_info(
            {
                "num_processes": accelerator.num_processes,
                "grad_accum_steps": accum,
                "device": str(accelerator.device),
                "mixed_precision": accelerator.mixed_precision,
                "compile": str(accelerator.state.dynamo_plugin.backend.value),
                "optimizer_fused": accelerator.device.type == "cuda",
            }
        )
        previous_config, previous_info = read_previous(run_dir)
        info = record_attempt(info, previous_info, previous_config, cfg.to_dict(), **attempt)
        save_config(cfg, run_dir / "config.yaml")
        write_json_atomic(run_dir / "run_info.json", info)
        shown = {k: v for k, v in info.items() if k != "attempts"}
        log((run_dir / "config.yaml").read_text() + json.dumps(shown, indent=2))
        if info["attempts"][-1]["changed"]:
            log(f"changed since the previous attempt: {info['attempts'][-1]['changed']}")
        log(
            f"batch: {data.total_batch_tokens:,} tokens/step = {data.micro_batch_size} x {data.seq_len} x "
            f"{accelerator.num_processes} processes x {accum} accumulation steps"
        )


@contextlib.contextmanager
def explained_failures(run_dir: Path):
    """Ctrl-C, and failures of the environment (disk, permissions), end with a message that says truthfully what
    can be resumed; other errors pass unchanged."""
    checkpoints = run_dir / "checkpoints"
    try:
        yield
    except KeyboardInterrupt:
        speaker = os.environ.get("RANK", "0") == "0"  # one message, not one per process
        raise Stop(f"interrupted: {resume_hint(checkpoints)}" if speaker else "", 130) from None
    except (ConfigError, RunError, DataError):
        raise
    except Exception as e:
        described = describe_environment_error(e)
        if described is None:
            raise
        saved = list_checkpoints(checkpoints)
        raise RunError(described + (f". Nothing is lost: {resume_hint(checkpoints)}" if saved else "")) from e
