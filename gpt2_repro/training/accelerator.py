"""The Accelerator a training config asks for: mixed precision, compilation, gradient accumulation, CPU threads; and
activation checkpointing, the other knob of how the model runs."""

from __future__ import annotations

import os
from datetime import timedelta

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, parse_flag_from_env

from ..base.config import TrainConfig, grad_accum_steps
from ..base.errors import ConfigError, Stop
from ..base.launch import is_main_process, launch_problem
from ..base.lock import LOCK_NAME
from ..base.run_folder import RunFolder


def precision_and_compile(cfg: TrainConfig, cuda: bool, env=os.environ) -> tuple[str, str]:
    """(mixed precision, dynamo backend): the config's values, or for "auto" bf16 + inductor on CUDA, none on CPU.

    "auto" takes the `accelerate launch` config's choice when it made one; `accelerate launch` exports
    ACCELERATE_MIXED_PRECISION=no and ACCELERATE_DYNAMO_BACKEND=NO when it was not told, so those mean "no choice".
    """
    precision, launched = cfg.run.mixed_precision, env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision == "auto":
        precision = launched if launched != "no" else "bf16" if cuda else "no"
    backend, launched = cfg.run.compile, env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if backend is None:
        backend = launched if launched != "no" else "inductor" if cuda else "no"
    else:
        backend = "inductor" if backend else "no"
    return precision, backend


def make_accelerator(cfg: TrainConfig, folder: RunFolder) -> Accelerator:
    """Accelerator with the settings above and the derived gradient accumulation; CPU threads; TF32 on CUDA."""
    cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    precision, backend = precision_and_compile(cfg, cuda)
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        precision = "fp16"  # V100, T4: fp16 with a gradient scaler
    trackers = [t.strip() for t in cfg.run.log_with.split(",") if t.strip() and t.strip() != "none"]
    # A collective waits this long for a process that died or hangs (gloo's default is 30 min, NCCL's 10), then
    # raises: the run ends naming what can be resumed (checkpointing.checkpoints.explained_failures).
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.dist_timeout))
    accelerator = Accelerator(
        mixed_precision=precision,
        dynamo_backend=backend,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(folder.root), logging_dir=str(folder.logs)),
        kwargs_handlers=[timeout],
    )
    check_one_run(accelerator, folder)
    data = cfg.data
    accelerator.gradient_accumulation_steps = grad_accum_steps(
        data.total_batch_tokens, data.micro_batch_size, data.seq_len, accelerator.num_processes
    )
    if accelerator.device.type == "cuda" and cfg.run.tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 params, ~8x the fp32 throughput
    if accelerator.device.type == "cpu":  # `accelerate launch` pins CPU jobs to 1 thread unless told otherwise
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(cfg.run.cpu_threads or max(1, cores // local_processes))
    return accelerator


def checkpoint_activations(cfg: TrainConfig, model) -> bool:
    """--gradient_checkpointing: transformers' activation checkpointing on every block (GPT2ReproBlock is a
    GradientCheckpointingLayer), in torch.utils.checkpoint's non-reentrant mode, the one DDP, FSDP2 and torch.compile
    support. A block then keeps only its input for the backward and runs its forward again there: the same numbers,
    one block's activations alive at a time. Called before accelerator.prepare, so that DDP, FSDP and compile wrap the
    checkpointed blocks. Returns whether the model checkpoints (its own flag, which the run records)."""
    if cfg.run.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model.is_activation_checkpointing


def check_one_run(accelerator: Accelerator, folder: RunFolder) -> None:
    """Refuse a launch whose processes did not join one process group (each would train the run on its own into
    one folder: base/launch.py), and processes that do not see the same run folder (machines without a shared file
    system: each would write its own part of every checkpoint where the others can never read it). Before anything
    but the main process's lock is written; the main process speaks, the others exit 2 silently."""
    problem = launch_problem(os.environ, accelerator.num_processes)
    if problem is None and accelerator.num_processes > 1:
        problem = _unshared_folder(accelerator, folder)
    if problem is not None:  # one group: its main process speaks; none: the launch's (RANK 0)
        speaks = accelerator.is_main_process if accelerator.num_processes > 1 else is_main_process()
        raise ConfigError(problem) if speaks else Stop("", 2)


def _unshared_folder(accelerator: Accelerator, folder: RunFolder, wait_seconds: float = 5.0) -> str | None:
    """Whether every process reads the lock file the main process wrote in the run folder (its pid, host and start
    time): None when they all do, else what to change. A network file system may show a new file a few seconds
    late, so each process looks again for `wait_seconds` before it says no."""
    import socket
    import time

    from accelerate.utils import broadcast_object_list, gather_object

    lock = folder.root / LOCK_NAME
    (expected,) = broadcast_object_list([_read(lock) if accelerator.is_main_process else None])
    deadline = time.monotonic() + wait_seconds
    while not (seen := _read(lock) == expected) and time.monotonic() < deadline:
        time.sleep(0.2)
    hosts = gather_object([(socket.gethostname(), seen)])
    if all(ok for _, ok in hosts):
        return None
    blind = sorted({host for host, ok in hosts if not ok})
    return (
        f"the processes of this run do not see one run folder: the lock the main process took in {folder.root} on "
        f"{hosts[0][0]} is not in the --output_dir that processes on {', '.join(blind)} see. Every machine writes "
        "its part of each checkpoint there, so --output_dir must be on a shared file system that every machine sees "
        "(NFS, Lustre, ...): checkpoints split across machines could never be resumed"
    )


def _read(path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
