"""Train GPT-2 (124M, or any size) on token shards or a text stream with accelerate: one GPU, many, or a laptop CPU.

    accelerate launch train.py --config configs/tiny.yaml                 # minutes on a laptop CPU
    accelerate launch train.py --config configs/gpt2_124m.yaml            # the GPT-2 reproduction
    python train.py --config configs/tiny.yaml --max_steps 40 --resume latest

Every field of the training config (gpt2_repro/config.py) is also an option (`--max_lr 1e-3`, `--micro_batch_size
16`, ...). The run folder (`--output_dir`) gets metrics.jsonl (one line per optimizer step, plus evaluation lines),
config.yaml and run_info.json (what ran, where), TensorBoard logs, checkpoints/step_N (full training states, each
also a model folder that AutoModelForCausalLM loads), and export/ + export-gpt2/ (the newest model).

The run has three parts: `preflight` makes every check that can refuse the run and writes nothing (but the run
folder's lock); `build` makes the model, optimizers, loader and the rest, restores a checkpoint, and only then
records the run; `train` is the loop. The components live in the gpt2_repro package.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from gpt2_repro import cli
from gpt2_repro.checkpoint import list_checkpoints
from gpt2_repro.config import TrainConfig, parameter_count, parse_args
from gpt2_repro.errors import ConfigError
from gpt2_repro.run_folder import (
    check_data_dir,
    check_room,
    checkpoint_bytes,
    claim_run_dir,
    explained_failures,
    is_main_process,
    record_run,
    verify_data,
)
from gpt2_repro.stopping import DivergenceGuard, diverged, preempted


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(argv, check_model=False)  # imports no torch: --help and a config error answer at once
    with explained_failures(Path(cfg.run.output_dir)), contextlib.ExitStack() as cleanup:
        checked = preflight(cfg, cleanup)
        run = build(cfg, checked, cleanup)
        return train(cfg, run, cleanup)


# ------------------------------------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class Checked:
    """What preflight found, and all that build needs from it: only preflight makes one."""

    accelerator: object
    encoding: object
    run_dir: Path
    log: object  # prints on the main process only
    found: Path | None  # the checkpoint to resume (None: a fresh start)
    uploader: object | None  # --push_to_hub's background uploader (main process)
    hellaswag: list[dict] | None  # the examples the run scores


def preflight(cfg: TrainConfig, cleanup: contextlib.ExitStack) -> Checked:
    """Every check that can refuse the run; nothing is written but the run folder's lock.

    The checks that need no torch come first, and those about the run folder, the data and the Hub are made by the
    main process alone, before the processes meet (a launcher stops the others when one exits): a second run into
    the folder, missing or corrupted data, a disk without room or a resume that does not fit is refused in about a
    second. Then the accelerator, and what depends on it.
    """
    from tqdm.auto import tqdm

    from gpt2_repro.resume import find_checkpoint
    from gpt2_repro.tokenizer import get_gpt2_encoding

    run_dir, main_process = Path(cfg.run.output_dir), is_main_process()
    log = tqdm.write if main_process else (lambda *_: None)
    check_data_dir(cfg)
    try:
        encoding = get_gpt2_encoding()
    except RuntimeError as e:  # offline without a cached vocabulary: the message gives the fix
        raise ConfigError(str(e)) from None
    uploader = None
    if main_process:
        cleanup.callback(claim_run_dir(run_dir, log).release)  # one run per folder, refused at once
        verify_data(cfg, log)
        check_room(run_dir, checkpoint_bytes(parameter_count(cfg.model)), "a checkpoint")
        if cfg.checkpoint.push_to_hub:  # no token or no write access fails here, not at the first checkpoint
            from gpt2_repro.hub import open_hub

            uploader = open_hub(cfg.checkpoint, run_dir)
    found = find_checkpoint(cfg, run_dir, int(os.environ.get("WORLD_SIZE", 1)), log)  # unreadable ones skipped
    cfg.check_model()  # the model's own checks import transformers: last of the quick ones

    from gpt2_repro.accelerator import make_accelerator
    from gpt2_repro.evaluator import training_hellaswag
    from gpt2_repro.optim import check_optimizer_support

    accelerator = make_accelerator(cfg, run_dir)
    check_optimizer_support(cfg, accelerator.distributed_type, 2 if accelerator.is_fsdp2 else 1)
    hellaswag = training_hellaswag(cfg, accelerator, log)  # a malformed file is refused now
    return Checked(accelerator, encoding, run_dir, log, found, uploader, hellaswag)


# ---------------------------------------------------------------------------------------------------- build


class Start(NamedTuple):
    """Where training starts: the step, the tokens seen, the newest evaluation and the line of training (1, or more
    after a resume from a checkpoint older than the folder's newest: gpt2_repro/resume.py)."""

    step: int
    tokens_seen: int
    last_eval: object  # LastEval
    line: int


@dataclass
class Run:
    """The built run: what the loop drives, and where it starts."""

    accelerator: object
    model: object  # the prepared (distributed, compiled) module that trains
    raw_model: object  # the plain module: evaluation, sampling, export (shares its parameters with `model`)
    optimizers: list
    loader: object
    evaluator: object
    checkpointer: object
    stop: object  # StopRequest: SIGTERM, SIGUSR1, the launcher's exit
    log: object
    start: Start


def build(cfg: TrainConfig, checked: Checked, cleanup: contextlib.ExitStack) -> Run:
    """Model, optimizers, loader, evaluation and checkpoints; the checkpoint to resume restored; then the run is
    recorded in its folder (the line of training, config.yaml, run_info.json): the first writes of this start."""
    import transformers
    from accelerate.utils import set_seed

    from gpt2_repro.checkpointer import Checkpointer
    from gpt2_repro.evaluator import Evaluator, LastEval
    from gpt2_repro.optim import build_optimizers, zero_output_projections
    from gpt2_repro.resume import refresh_export, start_line
    from gpt2_repro.stopping import StopRequest
    from gpt2_repro.tracking import tracker_config, tracker_init_kwargs, truncate_metrics
    from modeling_gpt2_repro import GPT2ReproForCausalLM

    acc, run_dir, log, found = checked.accelerator, checked.run_dir, checked.log, checked.found
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars at every checkpoint
    stop = cleanup.enter_context(StopRequest())  # SIGTERM, SIGUSR1, launcher exit: save and stop
    set_seed(cfg.run.seed)  # the same initial weights on every rank
    raw_model = GPT2ReproForCausalLM(cfg.model_config())
    if cfg.optim.zero_init_proj:  # a resumed run then loads its checkpoint's weights over these
        zero_output_projections(raw_model)
    model, *optimizers = acc.prepare(raw_model, *build_optimizers(raw_model, cfg, acc.device))
    loader = make_loader(cfg, acc)
    cleanup.callback(loader.close)  # a stream's reader threads, also when the run fails
    checkpointer = Checkpointer(cfg, acc, model, raw_model, loader, run_dir, checked.encoding, checked.uploader)
    state = checkpointer.restore(found)
    step, line, abandoned = state.get("step", 0), 1, None
    if acc.is_main_process:
        line, abandoned = start_line(run_dir, found, state)  # an older checkpoint: its later line moves aside
        refresh_export(run_dir, log)
        truncate_metrics(run_dir / "metrics.jsonl", step)  # the steps logged after the checkpoint are redone
    checkpointer.line = line
    val_data = loader.validation_tokens if cfg.data.dataset is not None else cfg.data.data_dir
    evaluator = Evaluator(cfg, acc, checked.encoding, run_dir, log, val_data, checked.hellaswag, line)
    attempt = {"start_step": step, "resumed_from": found and str(found), "line": line}
    record_run(cfg, acc, run_dir, log, **attempt, **({"abandoned": str(abandoned)} if abandoned else {}))
    if abandoned:
        log(f"line {line} of training starts at step {step}: the checkpoints after it moved to {abandoned}")
    log(f"resumed from step {step} ({run_dir})" if step else f"training from scratch in {run_dir}")
    init_kwargs = tracker_init_kwargs(cfg, run_dir, step) if acc.is_main_process else {}
    acc.init_trackers(cfg.run.project_name, config=tracker_config(cfg), init_kwargs=init_kwargs)
    start = Start(step, state.get("tokens_seen", 0), LastEval.of(state), line)
    return Run(acc, model, raw_model, optimizers, loader, evaluator, checkpointer, stop, log, start)


def make_loader(cfg: TrainConfig, accelerator):
    """This process's training batches: the loader shards by rank itself (never passed to `prepare`)."""
    data, rank, world = cfg.data, accelerator.process_index, accelerator.num_processes
    if data.dataset is not None:
        from gpt2_repro.stream_loader import StreamingTokenLoader

        return StreamingTokenLoader(
            data.dataset,
            data.dataset_name,
            data.dataset_split,
            data.text_column,
            batch_size=data.micro_batch_size,
            seq_len=data.seq_len,
            rank=rank,
            world_size=world,
            seed=cfg.run.seed,
            shuffle=data.shuffle,
            val_tokens=data.stream_val_tokens,
            shard_tokens=data.stream_shard_tokens,
            shuffle_windows=data.stream_shuffle_windows,
            keep_val_tokens=cfg.eval.val_tokens // data.seq_len * data.seq_len + 1,
            num_workers=data.stream_workers,
            batch_docs=data.stream_batch_docs,
            retries=data.stream_retries,
        )
    from gpt2_repro.loader import TokenShardLoader

    return TokenShardLoader(
        data.data_dir,
        split="train",
        batch_size=data.micro_batch_size,
        seq_len=data.seq_len,
        rank=rank,
        world_size=world,
        seed=cfg.run.seed,
        shuffle=data.shuffle,
    )


# ----------------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig, run: Run, cleanup: contextlib.ExitStack) -> Path:
    """The loop: an optimizer step at the scheduled LRs, its metrics line, the divergence guard, then the
    evaluation and the checkpoint when they are due. A stop request saves the step it is on and exits 75."""
    from tqdm.auto import tqdm

    from gpt2_repro.optim import set_lrs
    from gpt2_repro.step import train_step
    from gpt2_repro.tracking import StepLog

    t_start = time.time()
    acc, optim, data, log = run.accelerator, cfg.optim, cfg.data, run.log
    step, tokens_seen, last_eval, line = run.start
    bar = tqdm(total=optim.max_steps, initial=step, disable=not acc.is_main_process, desc="train", dynamic_ncols=True)
    cleanup.callback(bar.close)  # an error message then starts on a line of its own
    step_log = StepLog(cfg, acc, run.raw_model, bar, line)
    guard = DivergenceGuard(optim.max_bad_steps)
    if step and run.evaluator.due(step) and last_eval.val_step != step:
        last_eval = run.evaluator(run.raw_model, step)  # a stop saved before evaluating

    run.model.train()
    while step < optim.max_steps:
        t0 = time.perf_counter()
        lrs = set_lrs(run.optimizers, step, optim)
        result = train_step(acc, run.model, run.optimizers, run.loader, optim.grad_clip, run.stop)
        dt = time.perf_counter() - t0
        step, tokens_seen = step + 1, tokens_seen + data.total_batch_tokens
        step_log(step, tokens_seen, result, lrs, dt)
        in_streak = check_divergence(guard, result, step, cfg, log)
        if result.stop and step < optim.max_steps:  # preemption: save this step at once (not amid a streak), exit
            saved = None if in_streak else run.checkpointer.save(step, tokens_seen, last_eval)
            raise preempted(run.stop, step, saved, list_checkpoints(run.checkpointer.checkpoints), acc.is_main_process)
        if in_streak:
            continue  # no evaluation or checkpoint of weights whose last loss was not finite
        if run.evaluator.due(step):
            last_eval = run.evaluator(run.raw_model, step)
        if run.checkpointer.due(step):
            log(f"checkpoint {run.checkpointer.save(step, tokens_seen, last_eval)}")

    bar.close()
    run.stop.close()  # from here on SIGTERM ends the process as usual (the final checkpoint is written)
    acc.end_training()
    run.checkpointer.close(log)
    run_dir = Path(cfg.run.output_dir)
    log(f"done: {step} steps in {time.time() - t_start:.0f}s; model in {run_dir / 'export'}")
    return run_dir


def check_divergence(guard: DivergenceGuard, result, step: int, cfg: TrainConfig, log) -> bool:
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
        saved = list_checkpoints(Path(cfg.run.output_dir) / "checkpoints")
        ended = "" if guard.exhausted else "; the run ended inside this streak, so its last weights have no finite loss"
        raise diverged(guard.describe(step) + ended, saved, cfg.optim)
    return True


if __name__ == "__main__":
    cli.run(main)
