"""Train GPT-2 (124M, or any size) on token shards or a text stream with accelerate: one GPU, many, or a laptop CPU.

    accelerate launch train.py --config configs/tiny.yaml                 # minutes on a laptop CPU
    accelerate launch train.py --config configs/gpt2_124m.yaml            # the GPT-2 reproduction
    python train.py --config configs/tiny.yaml --max_steps 40 --resume latest
    python train.py --config configs/gpt2_774m.yaml --plan --gpu_memory 80GB --gpus 8   # memory per GPU: no GPU used

Every field of the training config (gpt2_repro/base/config.py) is also an option (`--max_lr 1e-3`, `--micro_batch_size
16`, ...). The run folder (`--output_dir`) gets metrics.jsonl (one line per optimizer step, plus evaluation lines),
config.yaml and run_info.json (what ran, where), TensorBoard logs, checkpoints/step_N (full training states, each
also a model folder that AutoModelForCausalLM loads), and export/ + export-gpt2/ (the newest model).

The run has three parts: `preflight` makes every check that can refuse the run and writes nothing (but the run
folder's lock); `build` makes the model, optimizers, data source and the rest, restores a checkpoint, and only
then records the run; `train` is the loop. The components live in the gpt2_repro package.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2_repro.base import cli
from gpt2_repro.base.config import TrainConfig, parse_command_line
from gpt2_repro.base.errors import ConfigError, Stop
from gpt2_repro.base.launch import is_main_process, launch_problem
from gpt2_repro.base.run_folder import RunFolder
from gpt2_repro.checkpointing.checkpoints import diverged, explained_failures, find_checkpoint
from gpt2_repro.checkpointing.folders import checkpoint_name, list_checkpoints
from gpt2_repro.data.source import source_type
from gpt2_repro.training.memory_plan import PlanOptions, print_plan
from gpt2_repro.training.stopping import DivergenceGuard, StopRequest, preempted, stopped_before_training

if TYPE_CHECKING:
    from collections.abc import Callable

    from accelerate import Accelerator
    from tiktoken import Encoding

    from gpt2_repro.checkpointing.checkpoints import Checkpoints, Start
    from gpt2_repro.data.source import DataSource
    from gpt2_repro.publishing.hub import HubUploader
    from gpt2_repro.training.periodic_eval import Evaluator
    from gpt2_repro.training.step import StepResult
    from modeling_gpt2_repro import GPT2ReproForCausalLM


def main(argv: list[str] | None = None) -> Path | None:
    cfg, plan = parse_command_line(argv, PlanOptions)  # imports no torch: --help and a config error answer at once
    if plan.plan:  # the memory plan: arithmetic on the config, nothing touched or written
        print_plan(cfg, plan)
        return None
    folder = RunFolder(cfg.run.output_dir)
    with explained_failures(folder), contextlib.ExitStack() as cleanup:
        stop = cleanup.enter_context(StopRequest())  # SIGTERM, SIGUSR1, launcher exit, from the start: save, exit 75
        checked = preflight(cfg, folder, cleanup)
        run = build(cfg, checked, stop, cleanup)
        return train(cfg, run, cleanup)


# ------------------------------------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class Checked:
    """What preflight found, and all that build needs from it: only preflight makes one."""

    accelerator: Accelerator
    encoding: Encoding
    folder: RunFolder
    log: Callable[[str], None]  # prints on the main process only
    found: Path | None  # the checkpoint to resume (None: a fresh start)
    uploader: HubUploader | None  # --push_to_hub's background uploader (main process)
    hellaswag: list[dict] | None  # the examples the run scores


def preflight(cfg: TrainConfig, folder: RunFolder, cleanup: contextlib.ExitStack) -> Checked:
    """Every check that can refuse the run; nothing is written but the run folder's lock.

    The checks that need no torch come first, and those about the run folder, the data and the Hub are made by the
    main process alone, before the processes meet (a launcher stops the others when one exits): a second run into
    the folder, missing or corrupted data, a disk without room or a resume that does not fit is refused in about a
    second. Then the accelerator, and what depends on it.
    """
    import os

    from gpt2_repro.data.tokenizer import get_gpt2_encoding
    from gpt2_repro.training.tracking import say

    main_process, data = is_main_process(), source_type(cfg.data.dataset)
    log = say if main_process else (lambda *_: None)
    if problem := launch_problem():  # processes that accelerate will run each alone: refused before the lock
        raise ConfigError(problem) if main_process else Stop("", 2)
    data.preflight(cfg)
    try:
        encoding = get_gpt2_encoding()
    except RuntimeError as e:  # offline without a cached vocabulary: the message gives the fix
        raise ConfigError(str(e)) from None
    uploader = None
    if main_process:
        cleanup.callback(folder.claim(log).release)  # one run per folder, refused at once
        data.verify(cfg, log)
        if cfg.checkpoint.push_to_hub:  # no token or no write access fails here, not at the first checkpoint
            from gpt2_repro.publishing.hub import open_hub

            uploader = open_hub(cfg.checkpoint, folder.root)
    # unreadable ones skipped; the disk must hold the checkpoints the run keeps at once (main process)
    found = find_checkpoint(cfg, folder, int(os.environ.get("WORLD_SIZE", 1)), log)
    cfg.check_model()  # the model's own checks import transformers: last of the quick ones

    from gpt2_repro.training.accelerator import make_accelerator
    from gpt2_repro.training.optim import check_optimizer_support
    from gpt2_repro.training.periodic_eval import training_hellaswag

    accelerator = make_accelerator(cfg, folder)
    check_optimizer_support(cfg, accelerator.distributed_type, 2 if accelerator.is_fsdp2 else 1)
    hellaswag = training_hellaswag(cfg, accelerator, log)  # a malformed file is refused now
    return Checked(accelerator, encoding, folder, log, found, uploader, hellaswag)


# ---------------------------------------------------------------------------------------------------- build


@dataclass
class Run:
    """The built run: what the loop drives, and where it starts."""

    accelerator: Accelerator
    model: GPT2ReproForCausalLM  # the prepared (distributed, compiled) module that trains
    raw_model: GPT2ReproForCausalLM  # the plain module: evaluation, sampling, export (shares `model`'s parameters)
    optimizers: list
    source: DataSource
    evaluator: Evaluator
    checkpoints: Checkpoints
    stop: StopRequest  # SIGTERM, SIGUSR1, the launcher's exit
    log: Callable[[str], None]
    start: Start


def build(cfg: TrainConfig, checked: Checked, stop: StopRequest, cleanup: contextlib.ExitStack) -> Run:
    """Model, optimizers, data source, evaluation and checkpoints; the checkpoint to resume restored; then the run
    is recorded in its folder (config.yaml, run_info.json with the line of training): the first writes of this
    start."""
    import transformers
    from accelerate.utils import set_seed

    from gpt2_repro.checkpointing.checkpoints import Checkpoints
    from gpt2_repro.data.source import open_data_source
    from gpt2_repro.training.accelerator import checkpoint_activations
    from gpt2_repro.training.optim import build_optimizers, zero_output_projections
    from gpt2_repro.training.periodic_eval import Evaluator
    from gpt2_repro.training.tracking import start_trackers
    from modeling_gpt2_repro import GPT2ReproForCausalLM

    acc, folder, log, found = checked.accelerator, checked.folder, checked.log, checked.found
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars at every checkpoint
    set_seed(cfg.run.seed)  # the same initial weights on every rank
    raw_model = GPT2ReproForCausalLM(cfg.model_config())
    if cfg.optim.zero_init_proj:  # a resumed run then loads its checkpoint's weights over these
        zero_output_projections(raw_model)
    checkpointing = checkpoint_activations(cfg, raw_model)  # before prepare: DDP, FSDP, compile wrap it
    model, *optimizers = acc.prepare(raw_model, *build_optimizers(raw_model, cfg, acc.device))
    stop.join(acc, cfg.run.dist_timeout)  # from here on every process agrees on a stop before each micro-batch
    source = open_data_source(cfg, acc.process_index, acc.num_processes)  # shards by rank itself: not prepared
    cleanup.callback(source.close)  # a stream's reader threads, also when the run fails
    checkpoints = Checkpoints(cfg, folder, acc, model, raw_model, source, checked.encoding, checked.uploader)
    start = checkpoints.restore(found, log)
    evaluator = Evaluator(
        cfg,
        acc,
        checked.encoding,
        folder,
        log,
        source.validation_data,
        checked.hellaswag,
        start.line,
        source.restore_hint(),
    )
    attempt = {"start_step": start.step, "resumed_from": found and str(found), "line": start.line}
    facts = {"gradient_checkpointing": checkpointing}
    abandoned = {"abandoned": str(start.abandoned)} if start.abandoned else {}
    folder.record_run(cfg, acc, log, facts, **attempt, **abandoned)
    if start.abandoned:
        log(
            f"line {start.line} of training starts at step {start.step}: the checkpoints after it moved to "
            f"{start.abandoned}"
        )
    log(f"resumed from step {start.step} ({folder})" if start.step else f"training from scratch in {folder}")
    start_trackers(acc, cfg, folder, start.step)
    return Run(acc, model, raw_model, optimizers, source, evaluator, checkpoints, stop, log, start)


# ----------------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig, run: Run, cleanup: contextlib.ExitStack) -> Path:
    """The loop: an optimizer step at the scheduled LRs, its metrics line, the divergence guard, then the
    evaluation and the checkpoint when they are due. A stop request ends the run at the next micro-batch with a
    quick checkpoint of its last completed step (`stop_here`), exit code 75."""
    from gpt2_repro.training.optim import set_lrs
    from gpt2_repro.training.step import StepStart, train_step
    from gpt2_repro.training.tracking import Progress, StepLog

    t_start = time.time()
    acc, optim, data, log, folder = run.accelerator, cfg.optim, cfg.data, run.log, run.checkpoints.folder
    step, tokens_seen, last_eval, line, _ = run.start
    progress = Progress(optim.max_steps, step, cfg.run.progress_interval, enabled=acc.is_main_process)
    cleanup.callback(progress.close)  # an error message then starts on a line of its own
    step_log = StepLog(cfg, folder, acc, run.raw_model, progress, line)
    guard = DivergenceGuard(optim.max_bad_steps)
    if step and run.evaluator.due(step) and last_eval.val_step != step and not run.stop.agreed():
        last_eval = run.evaluator(run.raw_model, step)  # saved before evaluating (a stop, a failure)
        run.checkpoints.add_evaluation(step, last_eval)
    if step >= optim.max_steps:
        log(f"nothing to train: the run is at step {step}, its --max_steps; to train longer, pass a larger one")

    run.model.train()
    while step < optim.max_steps:
        t0 = time.perf_counter()
        lrs = set_lrs(run.optimizers, step, optim)
        begun = StepStart.take(run.source)
        result = train_step(acc, run.model, run.optimizers, run.source, optim.grad_clip, run.stop)
        if result.abandoned:  # stopped at a micro-batch boundary: the state of the last completed step is saved
            begun.restore_rng()
            raise stop_here(run, step, tokens_seen, last_eval, guard.streak > 0, begun.position)
        dt = time.perf_counter() - t0
        step, tokens_seen = step + 1, tokens_seen + data.total_batch_tokens
        step_log(step, tokens_seen, result, lrs, dt)
        in_streak = check_divergence(guard, result, step, cfg, folder, log)
        if result.stop and step < optim.max_steps:  # asked during the step's last micro-batch: this step is saved
            raise stop_here(run, step, tokens_seen, last_eval, in_streak)
        if in_streak:
            continue  # no evaluation or checkpoint of weights whose last loss was not finite
        evaluate, save = run.evaluator.due(step), run.checkpoints.due(step)
        if save:  # first: an evaluation that fails (its data gone) or is killed then costs no training
            log(f"checkpoint {run.checkpoints.save(step, tokens_seen, last_eval, publish=not evaluate)}")
            if note := run.source.report():  # what reading the data found (a stream's skipped documents)
                log(note)
        if evaluate:
            last_eval = run.evaluator(run.raw_model, step)
            if save:
                run.checkpoints.add_evaluation(step, last_eval)  # what the checkpoint would say, saved after it

    progress.close()
    run.stop.close()  # from here on SIGTERM ends the process as usual (the final checkpoint is written)
    acc.end_training()
    run.checkpoints.close(log)
    log(f"done: {step} steps in {time.time() - t_start:.0f}s; model in {folder.export}")
    return folder.root


def stop_here(run: Run, step: int, tokens_seen: int, last_eval, in_streak: bool, position: dict | None = None):
    """The end of a run asked to stop: a quick checkpoint of `step`, the last completed optimizer step, with what a
    resume needs (the rest of it is written at the next start), then exit code 75. No checkpoint when `step` is
    saved already, when the run has not trained a step since it started, or when its weights are amid a streak of
    non-finite steps. `position`: the data position at the start of an abandoned step."""
    acc, folder = run.accelerator, run.checkpoints.folder
    if step == run.start.step:
        return stopped_before_training(run.stop, step, list_checkpoints(folder.checkpoints), acc.is_main_process)
    saved = None
    if run.checkpoints.saved_step == step:
        saved = folder.checkpoints / checkpoint_name(step)
    elif not in_streak:
        saved = run.checkpoints.save(step, tokens_seen, last_eval, quick=True, position=position)
    return preempted(run.stop, step, saved, list_checkpoints(folder.checkpoints), acc.is_main_process)


def check_divergence(
    guard: DivergenceGuard, result: StepResult, step: int, cfg: TrainConfig, folder: RunFolder, log
) -> bool:
    """Count the step in the divergence guard and report a bad one. True while a streak of bad steps goes on;
    RunError once the streak reaches --max_bad_steps, or when the run reaches max_steps inside one: its last
    weights would have no finite loss to show, so they are neither saved nor exported."""
    guard.update(step, result.bad, result.loss)
    if not result.bad:
        return False
    log(
        f"step {step}: loss {result.loss}, gradient norm {result.grad_norm}: not finite, update skipped "
        f"({guard.streak} in a row; the run stops at {guard.max_bad_steps})"
    )
    if guard.exhausted or step >= cfg.optim.max_steps:
        saved = list_checkpoints(folder.checkpoints)
        ended = "" if guard.exhausted else "; the run ended inside this streak, so its last weights have no finite loss"
        raise diverged(guard.describe(step) + ended, saved, cfg.optim)
    return True


if __name__ == "__main__":
    cli.run(main)
