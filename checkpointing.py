"""Checkpoint folders that are either complete or absent.

Layout of a run folder:

    checkpoints/step_00000500/      one complete training state, and a model folder in itself (see below)
    checkpoints/.tmp-step_00001000/ being written; renamed to step_00001000 only once every process has finished
    export/, export-gpt2/           hard-linked copies of the newest checkpoint's model files (no extra disk space)

Inside a checkpoint, the model is saved once, as transformers saves it: config.json, model.safetensors,
generation_config.json, modeling_gpt2_repro.py (remote code), the tokenizer and README.md (model card) at the
root, so `AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)` and `AutoTokenizer` load the
folder itself. accelerate's save_state writes the rest (optimizer.bin, random_states_N.pkl, scaler.pt), minus its
own copy of the weights: the trainer's save hook drops it and its load hook reads model.safetensors back
(`load_model_weights`). Beside them: loader_rankN.json (data positions), trainer_state.json, and export-gpt2/ (the
stock GPT2LMHeadModel, whose Conv1D layout and 50,257-row vocabulary make it a second copy that cannot be linked).
Under FSDP, accelerate keeps its sharded model state for resuming (pytorch_model_fsdp_0/), and model.safetensors
is the gathered full model: the weights are then stored twice, sharded and whole.

A checkpoint is written under a temporary name and renamed when whole (a rename is atomic on POSIX file systems),
so a crash leaves either the old set or the new one, never a half-written "latest". Rotation deletes the oldest
complete checkpoints only after the new one has been renamed into place, and renames a folder away before
deleting it, so a half-deleted checkpoint never looks complete either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from atomic_io import remove_tree, write_atomic
from cli import flat_options

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
STOCK_EXPORT = (
    "export-gpt2"  # the stock GPT2LMHeadModel, inside each checkpoint and in the run folder
)
TRAINER_STATE = "trainer_state.json"  # our own: optimizer step, tokens seen, process count, config


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temporary and half-deleted folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return sorted(found)


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """`--resume latest` -> the newest complete checkpoint under root (None: fresh start); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if (
        path.is_dir()
        and not (path / TRAINER_STATE).is_file()
        and list_checkpoints(path / "checkpoints")
    ):
        return list_checkpoints(path / "checkpoints")[-1][1]  # a run folder: its newest checkpoint
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a checkpoint folder (no {TRAINER_STATE} in {path}). Pass a "
            f"checkpoints/step_XXXXXXXX folder, a run folder, or 'latest'."
        )
    return path


def read_trainer_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


# What a checkpoint's state is bound to: the model's shapes, the optimizer (its state is saved), the batch per
# optimizer step (the LR schedule and the data position count steps of that many tokens), how the data is cut into
# windows and in which order (seq_len, seed, shuffle), and the data itself. Everything else (LRs, schedule,
# intervals, micro-batch, process count) may change.
RESUME_MUST_MATCH = (
    "optimizer",
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "vocab_size",
    "seq_len",
    "total_batch_tokens",
    "seed",
    "shuffle",
)
# A streamed run (--dataset) is bound to its stream and to the way it is cut into windows.
STREAM_MUST_MATCH = (
    "dataset",
    "dataset_name",
    "dataset_split",
    "text_column",
    "stream_val_tokens",
    "stream_shard_tokens",
    "stream_shuffle_windows",
)


def resume_mismatches(
    state: dict, config: dict, saved_data: str | None, current_data: str | None
) -> list[str]:
    """Each setting of `config` (a TrainConfig as a dict) that differs from the checkpoint whose trainer state is
    `state`, as "name: saved in the checkpoint, now"; the data is compared by the fingerprints of the training
    shards (token_data.data_fingerprint, saved in the checkpoint's loader state)."""
    saved, now = flat_options(state.get("config") or {}), flat_options(config)
    saved.setdefault("seq_len", state.get("seq_len"))  # checkpoints that predate the saved config
    problems = [
        f"{key}: {saved[key]!r} in the checkpoint, {now.get(key)!r} now"
        for key in RESUME_MUST_MATCH
        if saved.get(key) is not None and saved[key] != now.get(key)
    ]
    if saved.get("dataset") is not None or now.get("dataset") is not None:  # a stream then or now
        keys = STREAM_MUST_MATCH if saved.get("dataset") and now.get("dataset") else ("dataset",)
        problems += [
            f"{key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now"
            for key in keys
            if saved.get(key) != now.get(key)
        ]
    if saved_data and current_data and saved_data != current_data:
        where = saved.get("data_dir")
        moved = f" (data_dir {where!r} then, {now.get('data_dir')!r} now)" if where else ""
        problems.append(f"data: the training shards are not the checkpoint's{moved}")
    return problems


def resume_hint(root: str | Path) -> str:
    """What a user can resume from `root` (a checkpoints folder), said truthfully."""
    found = list_checkpoints(root)
    if not found:
        return "no checkpoint was written yet, so there is nothing to resume: rerun the command to start over"
    step, path = found[-1]
    return f"the newest complete checkpoint is {path} (step {step}): continue with --resume latest"


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folders themselves, so the rename that follows commits durable data."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where every process writes checkpoint `step` before it is committed (same path on every rank)."""
    return Path(root) / f".tmp-{checkpoint_name(step)}"


def commit_checkpoint(tmp: Path, keep_last: int) -> Path:
    """Main process, after every rank finished writing `tmp`: fsync, rename into place, then rotate."""
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    _fsync_tree(tmp)
    if (
        final.exists()
    ):  # this exact step was saved before: move it aside only now that its successor is whole
        remove_tree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for _, old in list_checkpoints(final.parent)[:-keep_last]:
        remove_tree(old)
    for leftover in final.parent.glob(".t*-step_*"):  # .tmp-/.trash- folders of an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop the log lines of steps after `step` (they were run after the checkpoint we resume from, and are redone)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # the half-written last line of a killed run
    write_atomic(path, "".join(line + "\n" for line in kept))


# Wrapper prefixes in the names of accelerate's own model.safetensors (checkpoints written before the model files
# moved to the root): DistributedDataParallel's and torch.compile's.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_model_weights(model, checkpoint: str | Path) -> None:
    """Copy the weights at the root of `checkpoint` (model*.safetensors, as save_pretrained wrote them) into
    `model`, bit for bit. The tied LM head may be absent from the file (it is the token embedding)."""
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{checkpoint} holds no model.safetensors: it is not a complete checkpoint. Resume from another one."
        )
    device = str(next(model.parameters()).device)
    state = {}
    for f in files:
        for name, tensor in load_file(f, device=device).items():
            while name.startswith(_WRAPPER_PREFIXES):
                name = name.split(".", 1)[1]
            state[name] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    untied_missing = [k for k in missing if k not in tied and k not in tied.values()]
    both_missing = [k for k, v in tied.items() if k in missing and v in missing]
    if unexpected or untied_missing or both_missing:
        raise RuntimeError(
            f"{checkpoint}: its weights do not fit this model (missing {untied_missing + both_missing}, "
            f"unexpected {unexpected}). Resume with the model settings it was trained with."
        )
