"""Checkpoint folders that are either complete or absent: their names, what they hold, whether they can be read,
and their commit, rotation and weights. Imports no torch, transformers or accelerate at import (the start-up
checks read checkpoints through it); the component that saves and restores them is `checkpoints.py`.

Layout of the run folder's checkpoints:

    checkpoints/step_00000500/      one complete training state, and a model folder in itself (see below)
    checkpoints/.tmp-step_00001000/ being written; renamed to step_00001000 only once every process has finished
    checkpoints/abandoned/...       checkpoints of a line of training that a resume from an older checkpoint left
                                    (checkpoints.py), kept, never taken as `latest` nor rotated
    export/, export-gpt2/           hard-linked copies of the newest checkpoint's model files (no extra disk space)
    checkpoint-500 -> checkpoints/step_00000500
                                    a relative symbolic link to the newest checkpoint under the name transformers'
                                    Trainer gives its own, so `transformers.trainer_utils.get_last_checkpoint(
                                    output_dir)` finds it (`link_newest_checkpoint`)

Inside a checkpoint, the model is saved once, as transformers saves it: config.json, model.safetensors,
generation_config.json, modeling_gpt2_repro.py (remote code), the tokenizer and README.md (model card) at the
root, so `AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)` and `AutoTokenizer` load the
folder itself. accelerate's save_state writes the rest (optimizer.bin, random_states_N.pkl, scaler.pt), minus its
own copy of the weights: the trainer's save hook drops it and its load hook reads model.safetensors back
(`load_model_weights`). Beside them: loader_rankN.json (data positions), run_state.json (what a resume needs: step,
tokens, process count, line, config), trainer_state.json (the same facts in transformers' TrainerState layout, for
tools that read Trainer checkpoints) and export-gpt2/ (the stock GPT2LMHeadModel, whose Conv1D layout and
50,257-row vocabulary make it a second copy that cannot be linked).
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

from ..base.atomic_io import remove_tree
from ..base.errors import NotFound
from ..base.run_folder import STOCK_EXPORT, RunFolder

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
TRAINER_NAME_RE = re.compile(r"^checkpoint-(\d+)$")  # transformers' trainer_utils: PREFIX_CHECKPOINT_DIR-<step>
RUN_STATE = "run_state.json"  # ours: optimizer step, tokens seen, process count, line, config, model files
TRAINER_STATE = "trainer_state.json"  # transformers' TrainerState (before run_state.json existed: ours)
ABANDONED = "abandoned"  # checkpoints/abandoned/: lines of training left by a resume from an older checkpoint
# Files of a checkpoint's root that are training state, not model: accelerate's and ours.
STATE_FILE_RE = re.compile(
    r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|sampler(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt"
    r"|custom_checkpoint_\d+\.pkl|loader_rank\d+\.json|run_state\.json|trainer_state\.json)$"
)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temporary and half-deleted folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """`--resume latest` -> the newest complete checkpoint under root (None: fresh start); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if path.is_symlink():  # the run folder's checkpoint-N: its checkpoint, whose siblings are the run's others
        path = path.resolve()
    if path.is_dir() and not is_checkpoint(path) and list_checkpoints(path / "checkpoints"):
        return list_checkpoints(path / "checkpoints")[-1][1]  # a run folder: its newest checkpoint
    if not is_checkpoint(path):
        raise NotFound(
            f"--resume {resume}: not a checkpoint folder (no {RUN_STATE} in {path}). Pass a "
            f"checkpoints/step_XXXXXXXX folder, a run folder, or 'latest'."
        )
    return path


def is_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` looks like a checkpoint (its run state is there; whether it can be read: checkpoint_problem)."""
    return (Path(folder) / RUN_STATE).is_file() or (Path(folder) / TRAINER_STATE).is_file()


def read_run_state(checkpoint: str | Path) -> dict:
    """What a checkpoint records for resuming: run_state.json, or trainer_state.json of the checkpoints written
    before run_state.json existed (it held the same facts). ValueError when neither holds a run state."""
    folder = Path(checkpoint)
    if (folder / RUN_STATE).is_file() or not (folder / TRAINER_STATE).is_file():
        return json.loads((folder / RUN_STATE).read_text())
    state = json.loads((folder / TRAINER_STATE).read_text())
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{folder / TRAINER_STATE} holds no run state (and there is no {RUN_STATE})")
    return state


def training_run_of(model: str | Path) -> tuple[dict | None, str]:
    """(the run state of the checkpoint a model folder is, with its config; None when there is none) and where it
    was read, or why there is none.

    The model folder may be a checkpoint, its export-gpt2/, the run folder's checkpoint-N link, or the run folder's
    export/ or export-gpt2/ while they hold the newest checkpoint's weights (as the trainer keeps them).
    """
    folder = Path(model)
    checkpoint = folder.parent if folder.name == STOCK_EXPORT and is_checkpoint(folder.parent) else folder
    if not is_checkpoint(checkpoint):
        run = RunFolder(folder.parent)
        if folder.name not in (run.export.name, run.stock_export.name) or not run.config.is_file():
            return None, f"{folder.name} is not a checkpoint or an export of a gpt2-repro training run"
        saved = list_checkpoints(run.checkpoints)
        if not saved:
            return None, f"{folder.name} is in a run folder that holds no checkpoint"
        checkpoint = saved[-1][1]
        weights = (checkpoint if folder == run.export else checkpoint / STOCK_EXPORT) / "model.safetensors"
        if not _same_file(folder / "model.safetensors", weights):
            return None, f"{folder.name}/ does not hold the run's newest checkpoint ({checkpoint.name})"
    try:
        state = read_run_state(checkpoint)
    except (OSError, ValueError) as e:
        return None, f"the run state of {checkpoint.name} cannot be read ({type(e).__name__})"
    if not isinstance(state.get("config"), dict):
        return None, f"the run state of {checkpoint.name} predates the saved config"
    return state, str(checkpoint)


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are the same file (a hard link) or equal copies."""
    import filecmp

    try:
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def model_files(checkpoint: str | Path) -> list[str]:
    """The files at the root of a checkpoint that make its model folder (what the run's export/ links to)."""
    listed = read_run_state(checkpoint).get("model_files")
    if listed:
        return listed
    return sorted(p.name for p in Path(checkpoint).iterdir() if p.is_file() and not STATE_FILE_RE.match(p.name))


def safetensors_problem(path: str | Path) -> str | None:
    """Why the safetensors file `path` cannot be read (its header, and whether the data covers it), or None.
    Reads no tensor and imports no torch: answers at once, however large the model."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            f.keys()
    except (OSError, SafetensorError) as e:
        return str(e)
    return None


def checkpoint_problem(checkpoint: str | Path, deep: bool = True) -> str | None:
    """Why `checkpoint` cannot be resumed, or None: a run state that does not parse, a data position that is
    missing, does not parse or is not one of the run's data source, each process's random states missing or
    empty, the weights or the optimizer state missing or unreadable (truncated, or refused by torch.load's
    weights_only, as a pickle that is not plain tensors is). Reads headers and metadata, not the tensors: cheap
    even for a large model. deep=False skips what imports torch: the optimizer state's structure and the random
    states' contents."""
    from ..base.cli import flat_options
    from ..data.source import source_type

    folder = Path(checkpoint)
    try:
        state = read_run_state(folder)
        processes = int(state.get("num_processes", 1))
        source = source_type(flat_options(state.get("config") or {}).get("dataset"))
        for rank in range(processes):
            name = f"loader_rank{rank}.json"
            if problem := source.position_problem(json.loads((folder / name).read_text())):
                return f"{name} holds no data position that can be resumed ({problem})"
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return f"its run state or data position cannot be read ({type(e).__name__}: {e})"
    randoms = [folder / f"random_states_{rank}.pkl" for rank in range(processes)]
    for path in randoms:  # accelerate would skip a missing or unreadable one with an INFO line: other dropout
        if not path.is_file() or path.stat().st_size == 0:
            return f"{path.name} (the random states of process {path.stem.rsplit('_', 1)[1]}) is missing or empty"
    weights = sorted(folder.glob("model*.safetensors"))
    if not weights:
        return "model.safetensors is missing"
    optimizers = sorted(folder.glob("optimizer*.bin"))
    if not optimizers and not list(folder.glob("optimizer*")):  # FSDP saves folders: checked when loaded
        return "optimizer.bin is missing"
    for path in weights:
        if problem := safetensors_problem(path):
            return f"{path.name} cannot be read ({problem})"
    if not deep:
        return None
    import torch

    for path in optimizers:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # structure only: no tensor is read
        except Exception as e:  # a truncated zip (RuntimeError), a refused pickle (UnpicklingError), ...
            return f"{path.name} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    for path in randoms:
        if problem := random_states_problem(path):
            return f"{path.name} cannot be read as random states ({problem})"
    return None


def random_states_problem(path: Path) -> str | None:
    """Why accelerate's load_state could not restore the random states in `path` (it would go on without them,
    saying so only at INFO level, and a run with dropout would then draw other masks than an uninterrupted one),
    or None. Loaded as accelerate loads them, and each state set on a generator of its own, not the process's."""
    import random

    import numpy as np
    import torch
    from accelerate.utils import load

    try:
        states = load(path)
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except Exception as e:  # truncated (RuntimeError), refused pickle (UnpicklingError), a key or type missing, ...
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


def checkpoint_step(checkpoint: str | Path) -> int | None:
    """The step a checkpoint folder's name says (`step_00000040`: 40), None for another name: read without
    opening the folder, so also for a checkpoint whose files cannot be read."""
    found = CHECKPOINT_RE.match(Path(checkpoint).name)
    return int(found.group(1)) if found else None


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
    if final.exists():  # this exact step was saved before: move it aside only now that its successor is whole
        remove_tree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for _, old in list_checkpoints(final.parent)[:-keep_last]:
        remove_tree(old)
    remove_leftovers(RunFolder(final.parent.parent))
    return final


def remove_leftovers(folder: RunFolder) -> None:
    """Remove what an interrupted save, rotation or export link left: .tmp- and .trash- folders of checkpoints
    and of the exports, a half-made checkpoint-N link (complete checkpoints and exports are never under those
    names)."""
    for leftover in [*folder.checkpoints.glob(".t*-step_*"), *folder.root.glob(".t*-export*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    for link in folder.root.glob(".tmp-checkpoint-*"):
        if link.is_symlink():
            link.unlink()


def link_newest_checkpoint(folder: RunFolder) -> str | None:
    """Point <run folder>/checkpoint-<step> at the newest complete checkpoint (a relative symbolic link, which a
    moved or copied run folder keeps) and remove the links to older ones; returns why the link could not be made,
    or None.

    transformers' Trainer saves `output_dir/checkpoint-<step>`, and the tools made for it look for the newest with
    `trainer_utils.get_last_checkpoint(output_dir)`: the link makes them find this run's newest checkpoint, a model
    folder with trainer_state.json, without a second copy and without renaming the step_N folders that runs already
    hold. Only links are replaced or removed, never a folder of that name.
    """
    saved = list_checkpoints(folder.checkpoints)
    want = None
    if saved:
        step, newest = saved[-1]
        want, target = folder.root / f"checkpoint-{step}", os.path.relpath(newest, folder.root)
        if not (want.is_symlink() and os.readlink(want) == target):
            tmp = folder.root / f".tmp-checkpoint-{step}"
            try:
                if tmp.is_symlink():
                    tmp.unlink()
                os.symlink(target, tmp, target_is_directory=True)
                os.replace(tmp, want)  # atomic: the name never points nowhere
            except OSError as e:
                if tmp.is_symlink():
                    tmp.unlink()
                return (
                    f"could not link {want} to the newest checkpoint ({e.strerror or e}): tools that look for "
                    f"Trainer's checkpoint-N names will not find it; {newest} is complete"
                )
    for old in folder.root.glob("checkpoint-*"):
        if old != want and old.is_symlink() and TRAINER_NAME_RE.match(old.name):
            old.unlink()
    return None


def checkpoint_bytes(n_params: int) -> int:
    """About the disk space of one checkpoint, with a margin: fp32 weights, AdamW's two moments and the stock
    export are 4 x 4 bytes per parameter (export/ is hard links); a fifth more covers tokenizer, cards and code."""
    return 5 * 4 * n_params


# Wrapper prefixes in the names of accelerate's own model.safetensors (checkpoints written before the model files
# moved to the root): DistributedDataParallel's and torch.compile's.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_model_weights(model, checkpoint: str | Path) -> None:
    """Copy the weights at the root of `checkpoint` (model*.safetensors, as save_pretrained wrote them) into
    `model`, bit for bit. The tied LM head may be absent from the file (it is the token embedding)."""
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint).glob("model*.safetensors"))
    if not files:
        raise NotFound(
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
