"""The run's checkpoints, one component: which one a start resumes and whether it fits, restoring it, saving and
rotating them, the exports kept current, the lines of training, and what a stopped run can resume.

- `find_checkpoint` (preflight, every process, before anything is written; imports no torch): `--resume latest`
  takes the newest checkpoint that can be read, skipping (one line each) those that cannot
  (`folders.checkpoint_problem`); a path that names an unreadable checkpoint is refused, naming the older ones.
  Settings that do not fit the checkpoint's are refused (`resume_mismatches`; the data source says what about the
  data must match).
- `Checkpoints` (built with the model): `restore` loads the checkpoint found (weights, optimizer, RNG states, the
  data source's position), continues or starts a line of training, mends the exports and leftovers of an
  interrupted run and drops the metrics of the steps it redoes; `save` writes a checkpoint at the steps `due` says.

A checkpoint is itself a model folder (`save_model_files`); accelerate's save_state adds the optimizer, RNG states
and its micro-step counter (not the weights: see `register_weight_hooks`); next to them go each process's data
position, run_state.json (what a resume needs) and trainer_state.json (the same in transformers' TrainerState
layout, with the run's metrics as its log_history). The run's export/ and export-gpt2/ are hard links to the newest
checkpoint's model files, uploaded to the Hub when asked, and its checkpoint-<step> a symbolic link to the newest
checkpoint, under the name Trainer gives its checkpoints. Folder layout and guarantees: `folders.py`.

Lines of training: a resume from a checkpoint older than the folder's newest starts a new line. The checkpoints of
the line it leaves (those after the resumed step) move to `checkpoints/abandoned/line-<N>-after-step_<S>/`, with
their metrics.jsonl lines: kept, but never taken as `latest` and never rotated away by the new line's checkpoints.
metrics.jsonl lines from line 2 on carry `"line": N`, and run_info.json records each attempt's line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ..base.atomic_io import link_tree, write_json_atomic
from ..base.cli import flat_options
from ..base.errors import ConfigError, RunError, Stop, describe_environment_error, describe_peer_failure
from ..base.launch import is_main_process
from ..base.run_folder import STOCK_EXPORT, RunFolder, step_of
from ..data.source import source_type
from .folders import (
    ABANDONED,
    RUN_STATE,
    STATE_FILE_RE,
    TRAINER_STATE,
    checkpoint_bytes,
    checkpoint_name,
    checkpoint_problem,
    checkpoint_step,
    commit_checkpoint,
    link_newest_checkpoint,
    list_checkpoints,
    load_model_weights,
    model_files,
    read_run_state,
    remove_leftovers,
    resolve_resume,
    resume_hint,
    temp_checkpoint_dir,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..base.config import OptimConfig, TrainConfig
    from ..data.source import DataSource
    from ..publishing.hub import HubUploader

# What a checkpoint's state is bound to: the model's shapes, the optimizer (its state is saved), the batch per
# optimizer step (the LR schedule and the data position count steps of that many tokens), how the data is cut into
# windows and in which order (seq_len, seed, shuffle), and the data itself (the data source's resume_problems).
# Everything else (LRs, schedule, intervals, micro-batch, process count) may change.
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


@dataclass(frozen=True)
class LastEval:
    """The run's newest evaluation: what a checkpoint's run state, trainer_state.json and model card report."""

    val_loss: float | None = None
    val_step: int | None = None
    hellaswag_acc_norm: float | None = None
    hellaswag_acc: float | None = None
    hellaswag_examples: int | None = None  # fewer than 10,042: a subset's score, labelled as one on the card

    @classmethod
    def of(cls, run_state: dict) -> LastEval:
        """The evaluation recorded in a checkpoint's run state (empty for a fresh start)."""
        return cls(**{f.name: run_state.get(f.name) for f in dataclasses.fields(cls)})


class Start(NamedTuple):
    """Where training starts: the step, the tokens seen, the newest evaluation, the line of training (1, or more
    after a resume from a checkpoint older than the folder's newest) and where an abandoned line went."""

    step: int = 0
    tokens_seen: int = 0
    last_eval: LastEval = LastEval()
    line: int = 1
    abandoned: Path | None = None


# ---------------------------------------------------------------------------------------- which checkpoint


def find_checkpoint(cfg: TrainConfig, folder: RunFolder, num_processes: int, log) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), refused before anything is written when it does not
    fit: an earlier run's checkpoints without --resume, settings that differ from the checkpoint's, a checkpoint
    the data source cannot continue with `num_processes` processes, or (main process) a disk that cannot hold the
    checkpoints the run will keep (`check_room_at_start`; before the checks that import torch, so it answers at
    once). Unreadable checkpoints are skipped by `--resume latest` (one line each) and refused when named by path."""
    root, resume = folder.checkpoints, cfg.checkpoint.resume
    if not resume:
        if list_checkpoints(root):
            raise ConfigError(
                f"{folder} already holds checkpoints of an earlier run. Continue it with --resume latest, "
                f"or train from scratch in another --output_dir."
            )
        return check_room_at_start(cfg, folder, None)
    latest = resume == "latest"
    candidates = [p for _, p in reversed(list_checkpoints(root))] if latest else [resolve_resume(resume, root)]
    for found in candidates:
        problem = checkpoint_problem(found, deep=False)
        if problem is None:
            _check_fits(cfg, found, num_processes)  # a refusal, not a fallback: the settings are the user's
            check_room_at_start(cfg, folder, found)
            problem = checkpoint_problem(found)
        if problem is None:
            return found
        if not latest:
            raise RunError(f"{found} cannot be resumed: {problem}. {_older_ones(found)}")
        log(f"warning: skipping {found}: {problem}; trying the next older checkpoint")
    if not candidates:
        return check_room_at_start(cfg, folder, None)
    raise RunError(
        f"no checkpoint in {root} can be read (each was skipped above): restore the files, or train from scratch "
        "in another --output_dir"
    )


def check_room_at_start(cfg: TrainConfig, folder: RunFolder, found: Path | None) -> None:
    """Refuse a start from `found` (None: a fresh start) whose disk cannot hold the checkpoints the run will keep
    at once (on the main process; nothing is written). A new checkpoint is written whole before the oldest is
    rotated away, so with `keep_last` K the folder holds up to K + 1 at once; the run's own saves (every
    checkpoint_every steps up to max_steps, and one more a stop request may add) and the checkpoints already there
    (those after the resumed step move to abandoned/ and stay) say how many of them are still to be written."""
    from ..base.config import parameter_count

    if not is_main_process():
        return
    one = checkpoint_bytes(parameter_count(cfg.model))
    start = read_run_state(found).get("step", 0) if found is not None else 0
    every, max_steps, keep = cfg.checkpoint.checkpoint_every, cfg.optim.max_steps, cfg.checkpoint.keep_last
    saves = (max_steps // every - start // every if every else 0) + (not every or max_steps % every != 0)
    if start >= max_steps:
        return  # nothing to train, nothing to save
    there = len([s for s, _ in list_checkpoints(folder.checkpoints) if s <= start])
    writes = saves + 1  # a stop request (SIGTERM) saves the step it is on
    most = max(there + 1, min(there + writes - 1, keep) + 1)  # held at once: the kept ones and the one written
    need = (most - there) * one
    kept = f"{most - there} more checkpoint{'s' if most - there > 1 else ''}"
    what = f"room for {kept} (a new one is written before the oldest of --keep_last {keep} is removed)"
    folder.check_room(need, what, one)


def _older_ones(found: Path) -> str:
    """What to resume instead of the unreadable checkpoint `found` (its step is its name's: its files may be what
    cannot be read)."""
    step = checkpoint_step(found)
    older = [p for s, p in list_checkpoints(found.parent) if p != found and (step is None or s < step)]
    if not older:
        return "No older checkpoint to fall back on: restore the files, or train from scratch in another --output_dir."
    return f"Resume an older one by path: --resume {older[-1]}" + (
        f" (older still: {', '.join(p.name for p in older[:-1])})" if len(older) > 1 else ""
    )


def _check_fits(cfg: TrainConfig, found: Path, num_processes: int) -> None:
    """ConfigError naming every setting that differs from the checkpoint's (nothing is changed)."""
    state, data = read_run_state(found), source_type(cfg.data.dataset)
    saved_data = json.loads((found / "loader_rank0.json").read_text()) | {"shard_files": state.get("shard_files")}
    problems = resume_mismatches(state, cfg.to_dict(), saved_data, data.resume_facts(cfg))
    if problems:
        run = found.parent.parent
        raise ConfigError(
            f"{found} cannot be resumed with these settings: " + "; ".join(problems) + ". Nothing was changed. "
            f"Resume with the checkpoint's values (`--config {run / 'config.yaml'} --output_dir {run} --resume "
            "latest` has them: the file names the folder the run was started in, which may have moved since), or "
            "train from scratch in another --output_dir."
        )
    step, max_steps = state.get("step", 0), cfg.optim.max_steps
    if step > max_steps:
        raise ConfigError(
            f"{found} is at step {step}, past --max_steps {max_steps}: there is nothing to train. To train longer, "
            f"resume it with a larger --max_steps (above {step}); to end at step {max_steps}, resume a checkpoint "
            "at or before it by path. Nothing was changed."
        )
    problem = data.elastic_problem(found, state.get("num_processes", num_processes), num_processes)
    if problem:
        raise ConfigError(problem)


def resume_mismatches(state: dict, config: dict, saved_data: dict | None, current_data: dict | None) -> list[str]:
    """Each setting of `config` (a TrainConfig as a dict) that differs from the checkpoint whose run state is
    `state`, as "name: saved in the checkpoint, now": RESUME_MUST_MATCH, then what the data source of `config`
    says about the data (`saved_data`: the checkpoint's loader state and shard list; `current_data`: the same of
    the data now, `DataSource.resume_facts`)."""
    saved, now = flat_options(state.get("config") or {}), flat_options(config)
    saved.setdefault("seq_len", state.get("seq_len"))  # checkpoints that predate the saved config
    problems = [
        f"{key}: {saved[key]!r} in the checkpoint, {now.get(key)!r} now"
        for key in RESUME_MUST_MATCH
        if saved.get(key) is not None and saved[key] != now.get(key)
    ]
    return problems + source_type(now.get("dataset")).resume_problems(saved, now, saved_data, current_data)


# ------------------------------------------------------------------------------------------- the component


class Checkpoints:
    """The run's checkpoints once the model is built: `restore` at start, `save` at the steps `due` says, `close`
    at the end. `source` is the data source whose position and identity the checkpoints record."""

    def __init__(
        self,
        cfg: TrainConfig,
        folder: RunFolder,
        accelerator: Accelerator,
        model,
        raw_model,
        source: DataSource,
        encoding,
        uploader: HubUploader | None = None,
    ):
        from ..data.tokenizer import build_hf_tokenizer

        self.cfg, self.folder, self.accelerator = cfg, folder, accelerator
        self.model, self.raw_model, self.source, self.uploader = model, raw_model, source, uploader
        self.tokenizer = None
        if accelerator.is_main_process:
            self.tokenizer = build_hf_tokenizer(encoding, model_max_length=cfg.model.n_positions)
        self.card = {"config": cfg.to_dict(), "data_source": source.identity, "repo_id": cfg.checkpoint.push_to_hub}
        self.line = 1  # the line of training the checkpoints belong to (set by restore)
        self.saved_step: int | None = None  # the step this start last saved, the same on every process
        register_weight_hooks(accelerator, raw_model)

    def due(self, step: int) -> bool:
        return self.cfg.optim.is_due(step, self.cfg.checkpoint.checkpoint_every)

    # ---------------------------------------------------------------------------------------------- restore

    def restore(self, found: Path | None, log) -> Start:
        """Restore checkpoint `found` (None: a fresh start); then, on the main process, the line of training,
        the exports and leftovers of an interrupted run, and metrics.jsonl cut back to the resumed step.

        Another number of processes than the checkpoint's is fine where the data source allows it (find_checkpoint
        made sure the tokens per step are the same): the data position is global, so every process continues from
        it, and the weights, optimizer state and step are the checkpoint's. Only the per-process RNG streams
        (dropout, if any) cannot carry over; they are re-seeded from (seed, step, rank).
        """
        state = self._load(found) if found is not None else {}
        step, line, abandoned, last_eval = state.get("step", 0), 1, None, LastEval.of(state)
        if self.accelerator.is_main_process:
            if found is not None:
                line, abandoned = self._start_line(step, state.get("line", 1))
                _mend_trainer_state(found, self.folder.log_history(step), log)
            self._refresh_exports(log)
            # The steps logged after the checkpoint are redone, and so is an evaluation of its own step that it
            # does not record (a run stopped between evaluating and recording it: see add_evaluation).
            self.folder.truncate_metrics(step, keep_evaluation=last_eval.val_step == step)
        self.line = line
        return Start(step, state.get("tokens_seen", 0), last_eval, line, abandoned)

    def _load(self, found: Path) -> dict:
        import numpy as np
        from accelerate.utils import set_seed

        acc = self.accelerator
        state = read_run_state(found)
        saved_processes = state.get("num_processes", acc.num_processes)
        # A rank without random_states_<rank>.pkl (more processes than the checkpoint's) keeps its RNGs: see below.
        acc.load_state(str(found))
        acc.step = 0  # accelerate's micro-step counter: saves happen on optimizer-step boundaries
        position = found / f"loader_rank{acc.process_index}.json"
        if saved_processes != acc.num_processes:
            seed = np.random.SeedSequence([self.cfg.run.seed, state["step"], acc.process_index])
            set_seed(int(seed.generate_state(1)[0]))
            position = found / "loader_rank0.json"  # every rank saved the same global position
        self.source.load_state_dict(json.loads(position.read_text()))
        return state

    def _start_line(self, step: int, line: int) -> tuple[int, Path | None]:
        """(the line this start continues or begins, the folder an abandoned line was moved to or None).

        A resume continues the checkpoint's line, unless the folder holds checkpoints after the resumed step: then
        it begins the next line, and those checkpoints, with the metrics.jsonl lines of their steps, move to
        checkpoints/abandoned/ (nothing is deleted).
        """
        root = self.folder.checkpoints
        later = [p for s, p in list_checkpoints(root) if s > step]
        if not later:
            # A line that began at this checkpoint and was stopped before it saved one of its own (its abandoned
            # predecessor is named after this step) goes on: the steps after it must not take the label of the
            # abandoned ones.
            named = [_ABANDONED_RE.match(p.name) for p in _abandoned(root)]
            begun = [max(line, int(m.group(1))) + 1 for m in named if int(m.group(2)) == step]
            return max([line, *begun]), None
        left = max(_line_of(p) for p in later)
        aside = root / ABANDONED / f"line-{left}-after-step_{step:08d}"
        for n in range(2, 1000):  # the same step abandoned twice
            if not aside.exists():
                break
            aside = aside.with_name(f"line-{left}-after-step_{step:08d}-{n}")
        aside.mkdir(parents=True)
        for path in later:
            os.replace(path, aside / path.name)
        rows = [row for row in self.folder.metrics_rows() if step_of(row) > step]
        if self.folder.metrics.is_file():
            (aside / self.folder.metrics.name).write_text("".join(row + "\n" for row in rows))
        return max(line, left) + 1, aside

    def _refresh_exports(self, log) -> None:
        """Remove what an interrupted save, rotation or link left, and make export/ and export-gpt2/ the newest
        checkpoint's again if they are not (a run killed after committing a checkpoint and before linking it left
        them at the previous one, for good)."""
        remove_leftovers(self.folder)
        if problem := link_newest_checkpoint(self.folder):  # runs saved before the link existed get it here
            log(f"warning: {problem}")
        saved = list_checkpoints(self.folder.checkpoints)
        for _, checkpoint in saved:
            if read_run_state(checkpoint).get("deferred"):
                self._complete(checkpoint, log)
        if not saved:
            return
        step, newest = saved[-1]
        stock = sorted(p.name for p in (newest / STOCK_EXPORT).iterdir())
        if _holds(self.folder.export, newest, model_files(newest)) and _holds(
            self.folder.stock_export, newest / STOCK_EXPORT, stock
        ):
            return
        self._link_exports(newest)
        log(f"export/ and {STOCK_EXPORT}/ were behind: they now hold the newest checkpoint, {newest} (step {step})")

    def _complete(self, checkpoint: Path, log) -> None:
        """Write the parts of a quick save's model folder that were deferred (tokenizer, card, stock export), then
        record them: the checkpoint is then the same as one saved whole."""
        state = read_run_state(checkpoint)
        save_model_folder_rest(checkpoint, self.tokenizer, self._card(state))
        state.pop("deferred")
        state["model_files"] = sorted(
            p.name for p in checkpoint.iterdir() if p.is_file() and not STATE_FILE_RE.match(p.name)
        )
        write_json_atomic(checkpoint / RUN_STATE, state)
        log(f"{checkpoint}: wrote its tokenizer, model card and stock export, deferred when the run stopped")

    def _link_exports(self, checkpoint: Path) -> None:
        """export/ and export-gpt2/: hard links to `checkpoint`'s model files (no extra disk space)."""
        link_tree(checkpoint, self.folder.export, names=model_files(checkpoint))
        link_tree(checkpoint / STOCK_EXPORT, self.folder.stock_export)

    # ------------------------------------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        tokens_seen: int,
        last_eval: LastEval,
        quick: bool = False,
        position: dict | None = None,
        publish: bool = True,
    ) -> Path | None:
        """Checkpoint `step`, guarded: never of non-finite weights (RunError naming the last good checkpoint), not
        without the disk space for it (RunError naming the way back), and a failed or interrupted save removes its
        temporary folder (the previous checkpoints are untouched: they are replaced only by a complete new one).
        Returns the checkpoint folder (None on processes other than the main one).

        quick: a stopping run's save, inside a launcher's grace: only what a resume needs (weights, optimizer, RNG
        states, data positions, run state), committed and flushed; the tokenizer, card and stock export, which can
        be rebuilt from it, and the exports and Hub uploads follow at the next start (`restore`). `position`: the
        data position to record instead of the source's current one (a step abandoned half-way: `StepStart`).
        publish=False leaves the Hub upload to `add_evaluation`."""
        import torch

        from ..evaluation.models import nonfinite_parameters

        acc, root = self.accelerator, self.folder.checkpoints
        bad = nonfinite_parameters(self.raw_model)
        count = acc.reduce(torch.tensor(float(len(bad)), device=acc.device), reduction="sum")
        if count.item():  # FSDP: each process checked its own shards
            names = f" (e.g. {', '.join(bad[:3])})" if bad else ""
            what = f"the weights at step {step} hold NaN or inf{names}"
            raise diverged(what, list_checkpoints(root), self.cfg.optim)
        need, what = checkpoint_bytes(sum(p.numel() for p in self.raw_model.parameters())), f"checkpoint step {step}"
        problem = None
        if acc.is_main_process:
            try:
                problem = self.folder.room_problem(need, what)
            except OSError as e:  # the disk itself cannot be asked: an environment failure, or a bug
                problem = describe_environment_error(e)
                if problem is None:
                    raise
        problem = _agree(acc, problem)
        if problem:  # on every process: none is left waiting for the others in a collective
            raise RunError(f"{problem} {_not_saved(root, step)}")
        try:
            final = self._write(self._run_state(step, tokens_seen, last_eval), quick, position, publish)
            self.saved_step = step
            return final
        except BaseException as e:
            if acc.is_main_process:
                shutil.rmtree(temp_checkpoint_dir(root, step), ignore_errors=True)
            # torch.save reports a short write as "unexpected pos", without an errno: look at the disk itself.
            problem = None
            if isinstance(e, Exception) and describe_environment_error(e) is None:
                problem = self.folder.room_problem(need, what)
            if problem:
                raise RunError(
                    f"{what} could not be written ({type(e).__name__}: {e}): {problem} Then {resume_hint(root)}"
                ) from e
            raise

    def _run_state(self, step: int, tokens_seen: int, last_eval: LastEval) -> dict:
        """run_state.json of a checkpoint: where training stands, and the settings it is bound to."""
        data = self.cfg.data
        state = {"step": step, "tokens_seen": tokens_seen, "num_processes": self.accelerator.num_processes}
        state |= {"micro_batch_size": data.micro_batch_size, "seq_len": data.seq_len, "line": self.line}
        state |= self.source.checkpoint_facts()  # what the data position refers to
        return state | asdict(last_eval) | {"config": self.cfg.to_dict()}

    def _trainer_state(self, run_state: dict) -> dict:
        """trainer_state.json of a checkpoint, with the run's metrics up to its step as `log_history`."""
        return trainer_state(run_state, self.folder.log_history(run_state["step"]))

    def _card(self, run_state: dict) -> dict:
        """The model card's facts for a checkpoint whose run state is `run_state`."""
        card = {**self.card, "config": run_state.get("config") or self.card["config"]}
        card |= {"step": run_state["step"], "tokens": run_state["tokens_seen"]}
        return card | {
            k: run_state.get(k) for k in ("val_loss", "val_step", "hellaswag_acc_norm", "hellaswag_examples")
        }

    def _write(
        self, run_state: dict, quick: bool = False, position: dict | None = None, publish: bool = True
    ) -> Path | None:
        from accelerate import DistributedType

        acc, step = self.accelerator, run_state["step"]
        tmp = temp_checkpoint_dir(self.folder.checkpoints, step)
        full_state = None  # under FSDP, gather the whole model (a collective: every rank calls it)
        if acc.distributed_type == DistributedType.FSDP:  # FSDP2 shards raw_model in place; it has no _orig_mod.
            full_state = acc.get_state_dict(self.raw_model if acc.is_fsdp2 else self.model)
        written = []
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving this same step
            save_weights(self.raw_model, tmp, state_dict=full_state)
            if quick:
                run_state["deferred"] = True  # the rest of the model folder: written at the next start
            else:
                save_model_folder_rest(tmp, self.tokenizer, self._card(run_state))
            written = sorted(p.name for p in tmp.iterdir() if p.is_file())
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # optimizer, RNG states, scaler (the weights: save_weights)
        write_json_atomic(tmp / f"loader_rank{acc.process_index}.json", position or self.source.state_dict())
        if acc.is_main_process:
            write_json_atomic(tmp / RUN_STATE, {**run_state, "model_files": written})
            write_json_atomic(tmp / TRAINER_STATE, self._trainer_state(run_state))
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            final = commit_checkpoint(tmp, self.cfg.checkpoint.keep_last)
            if not quick:  # a quick save's exports, link and uploads follow the rest of its model folder (next start)
                self._link_exports(final)
                link_newest_checkpoint(self.folder)  # a failure was said once at start (_refresh_exports)
                if publish:
                    self._upload(step)
        acc.wait_for_everyone()
        return final

    def _upload(self, step: int) -> None:
        from ..publishing.hub import STOCK_GPT2_BRANCH

        if self.uploader:
            self.uploader.submit(self.folder.export, f"step {step}")
            self.uploader.submit(self.folder.stock_export, f"step {step}", revision=STOCK_GPT2_BRANCH)

    def add_evaluation(self, step: int, last_eval: LastEval) -> None:
        """Record the evaluation of `step` in the checkpoint of that step, then publish it (main process).

        The loop saves a checkpoint before evaluating the same step, so that an evaluation that fails (its data
        gone) or is killed loses no training; this then adds what the evaluation found, as a save after it would
        have recorded it: the run state, trainer_state.json and both model cards say it, the exports link the new
        cards, and the Hub upload goes. A start that evaluates its resumed step does the same."""
        from ..publishing.cards import write_model_card

        checkpoint = self.folder.checkpoints / checkpoint_name(step)
        if not self.accelerator.is_main_process or not checkpoint.is_dir():
            return
        state = read_run_state(checkpoint) | asdict(last_eval)
        card = self._card(state)
        write_model_card(checkpoint, **card)
        write_model_card(checkpoint / STOCK_EXPORT, **card, stock_gpt2=True)
        write_json_atomic(checkpoint / TRAINER_STATE, self._trainer_state(state))
        write_json_atomic(checkpoint / RUN_STATE, state)  # last: until then a resume evaluates this step again
        if list_checkpoints(self.folder.checkpoints)[-1][1] == checkpoint:
            self._link_exports(checkpoint)
            self._upload(step)

    def close(self, log) -> None:
        if self.uploader:
            log(f"waiting for the last Hub upload to {self.uploader.repo_id}...")
            self.uploader.close()


def _not_saved(root: Path, step: int) -> str:
    """What a save that cannot be written loses, and the way back."""
    saved = list_checkpoints(root)
    since = saved[-1][0] + 1 if saved else 1
    steps = f"Step {step} is" if since == step else f"Steps {since}-{step} are"
    if not saved:
        return f"{steps} not saved, and no checkpoint was written yet: once there is room, rerun the command."
    return f"{steps} not saved: once there is room, {resume_hint(root)}."


def trainer_state(run_state: dict, history: list[dict]) -> dict:
    """A checkpoint's run state (with the config it holds) in the layout of transformers' TrainerState
    (`TrainerState.load_from_json` reads it), for the tools that read a Trainer checkpoint's trainer_state.json:
    step, tokens, intervals, and as `log_history` the run's metrics up to this step, training steps and
    evaluations, under Trainer's names (`loss`, `learning_rate`, `grad_norm`, `eval_loss`, ...;
    RunFolder.log_history)."""
    from transformers import TrainerState

    config = flat_options(run_state.get("config") or {})
    state = TrainerState(
        global_step=run_state["step"],
        max_steps=config.get("max_steps", 0),
        logging_steps=1,
        eval_steps=config.get("eval_every", 500),
        save_steps=config.get("checkpoint_every", 500),
        train_batch_size=run_state.get("micro_batch_size", config.get("micro_batch_size")),
        num_input_tokens_seen=run_state["tokens_seen"],
        log_history=history,
    )
    return asdict(state)


def _mend_trainer_state(checkpoint: Path, history: list[dict], log) -> None:
    """Rewrite a checkpoint's trainer_state.json from its run_state.json when transformers' TrainerState cannot
    read it or it names another step. A resume does not need it (run_state.json is what it reads), but the tools
    made for Trainer checkpoints do, and they would fail on it later, far from the cause."""
    from transformers import TrainerState

    path, state = checkpoint / TRAINER_STATE, read_run_state(checkpoint)
    if not (checkpoint / RUN_STATE).is_file() or "config" not in state:
        return  # a checkpoint from before run_state.json: trainer_state.json is its run state, and it was read
    try:
        if TrainerState.load_from_json(path).global_step == state["step"]:
            return
        problem = "it names another step"
    except (OSError, ValueError, TypeError) as e:
        problem = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    try:
        write_json_atomic(path, trainer_state(state, history))
        done = "rewritten from run_state.json"
    except OSError as e:  # a checkpoint resumed from a folder this run may not write: it is only read
        done = f"not rewritten ({e.strerror or e})"
    log(f"warning: {path} could not be read ({problem}): {done} (the resume does not need it)")


def _agree(accelerator, value):
    """The main process's `value`, on every process (a collective when there are several)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


_ABANDONED_RE = re.compile(r"^line-(\d+)-after-step_(\d+)(-\d+)?$")


def _abandoned(root: Path) -> list[Path]:
    """The folders of checkpoints/abandoned/ named as _start_line names them, in name order."""
    folder = root / ABANDONED
    return sorted(p for p in folder.iterdir() if _ABANDONED_RE.match(p.name)) if folder.is_dir() else []


def _line_of(checkpoint: Path) -> int:
    try:
        return int(read_run_state(checkpoint).get("line", 1))
    except (OSError, ValueError):
        return 1


def _holds(export: Path, checkpoint: Path, names: list[str]) -> bool:
    """Whether `export` holds exactly the files `names` of `checkpoint` (the same files, or equal copies)."""
    if not export.is_dir() or sorted(p.name for p in export.iterdir()) != sorted(names):
        return False
    for name in names:
        a, b = export / name, checkpoint / name
        if not (os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)):
            return False
    return True


# ------------------------------------------------------------------------------------------- model files


def save_model_files(model, folder: Path, tokenizer, card: dict, state_dict=None) -> list[str]:
    """The model as transformers saves it, at the root of `folder`, and the stock GPT2LMHeadModel in
    folder/export-gpt2 (`save_weights`, then `save_model_folder_rest`). Returns the names written at the root (what
    the run's export/ links to).

    Root: config.json, model.safetensors, generation_config.json, modeling_gpt2_repro.py, tokenizer, model card:
    `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it.
    """
    save_weights(model, folder, state_dict)
    save_model_folder_rest(folder, tokenizer, card)
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def save_weights(model, folder: Path, state_dict=None) -> None:
    """`save_pretrained` of the model: config.json, generation_config.json, model.safetensors and its code (what a
    resume needs of the model), group-readable like the rest on a cluster."""
    from modeling_gpt2_repro import GPT2ReproForCausalLM

    from ..base.atomic_io import follow_umask

    if type(model) is not GPT2ReproForCausalLM:
        # FSDP2 swaps the module's class for a subclass of its own, whose source file (torch's FSDP code)
        # transformers would copy as the remote code. Save the gathered weights through a plain model.
        plain = GPT2ReproForCausalLM(model.config)
        missing, unexpected = plain.load_state_dict(state_dict or model.state_dict(), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head may be left out
            raise RuntimeError(f"saving the model: missing {missing}, unexpected {unexpected}")
        model, state_dict = plain, None
    model.save_pretrained(folder, state_dict=state_dict)
    follow_umask(folder)  # model.safetensors is written 0600


def save_model_folder_rest(folder: Path, tokenizer, card: dict) -> None:
    """What completes the model folder of saved weights: the tokenizer, the model card, and the stock
    GPT2LMHeadModel in folder/export-gpt2, converted from the folder's own weights (not from the live module),
    which also proves that they load, whatever wraps the live module (DDP, FSDP)."""
    import torch

    from modeling_gpt2_repro import GPT2ReproForCausalLM

    from ..base.atomic_io import follow_umask, link_or_copy
    from ..publishing.cards import write_model_card

    tokenizer_files = [Path(f).name for f in tokenizer.save_pretrained(folder)]
    write_model_card(folder, **card)
    stock = folder / STOCK_EXPORT
    GPT2ReproForCausalLM.from_pretrained(folder, dtype=torch.float32).to_official_gpt2().save_pretrained(stock)
    for name in tokenizer_files:  # the same tokenizer: linked, not written twice
        link_or_copy(folder / name, stock / name)
    write_model_card(stock, **card, stock_gpt2=True)
    for files in (folder, stock):  # model.safetensors is written 0600: group-readable like the rest on a cluster
        follow_umask(files)


def register_weight_hooks(accelerator: Accelerator, raw_model) -> None:
    """accelerate's save_state/load_state with the model's weights as `save_pretrained` stores them.

    accelerate would write its own model.safetensors, named after whatever wraps the module (DDP's `module.`,
    torch.compile's `_orig_mod.`), which from_pretrained cannot read and which would be a second copy of the
    weights. Its save hook lets us drop that copy (save_model_files writes the model), its load hook read ours
    back. Under FSDP accelerate saves and loads its sharded state itself: its lists are empty here.
    """

    def drop_weights(models, weights, output_dir):
        weights.clear()

    def load_weights(models, input_dir):
        if models:
            load_model_weights(raw_model, input_dir)
            models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(load_weights)


# ------------------------------------------------------------------------------ what a stopped run can resume


def diverged(what: str, saved: list[tuple[int, Path]], optim: OptimConfig) -> RunError:
    """The error that ends a diverged run: what happened, what can be resumed (`saved`: the complete checkpoints,
    oldest first, as `folders.list_checkpoints` gives them), what to try (`optim`: the run's OptimConfig)."""
    lower = f"--max_lr {optim.max_lr / 2:g}"
    lower += f" --muon_lr {optim.muon_lr / 2:g}" if optim.optimizer == "muon" else ""
    if not saved:
        return RunError(
            f"training diverged: {what}. No checkpoint was written, so there is nothing to resume: start over "
            f"with a lower learning rate (e.g. {lower}) or other optimizer settings."
        )
    (step, newest), older = saved[-1], [p for _, p in saved[:-1]]
    fallback = f" If it diverges again, resume from {older[-1]} instead." if older else ""
    return RunError(
        f"training diverged: {what}. Nothing was saved after that: the newest checkpoint, {newest} (step {step}), "
        f"holds finite weights. Resume it with a lower learning rate: --resume latest {lower}.{fallback} If it "
        "always happens at the same step, check the data there."
    )


@contextlib.contextmanager
def explained_failures(folder: RunFolder):
    """Ctrl-C, and failures of the environment (disk, permissions), end with a message that says truthfully what
    can be resumed; other errors pass unchanged."""
    from ..base.errors import DataError

    try:
        yield
    except KeyboardInterrupt:
        speaker = is_main_process()  # one message, not one per process
        raise Stop(f"interrupted: {resume_hint(folder.checkpoints)}" if speaker else "", 130) from None
    except (ConfigError, RunError, DataError):
        raise
    except Exception as e:
        peer = describe_peer_failure(e)
        described = describe_environment_error(e) or peer
        if described is None:
            raise
        if peer and os.environ.get("LOCAL_RANK", "0") != "0":  # one line per machine, from its first process
            raise Stop("", 2) from e
        if peer:  # the survivors stop too; the run continues from its newest checkpoint, on every machine
            raise RunError(f"{peer}; {resume_hint(folder.checkpoints)}") from e
        saved = list_checkpoints(folder.checkpoints)
        hint = f". Nothing is lost: {resume_hint(folder.checkpoints)}" if saved else ""
        raise RunError(described + hint) from e
