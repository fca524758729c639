"""The Accelerator a training config asks for: mixed precision, compilation, gradient accumulation, CPU threads; and
activation checkpointing, the other knob of how the model runs."""

from __future__ import annotations

import os

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, parse_flag_from_env

from ..base.config import TrainConfig, grad_accum_steps
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
    accelerator = Accelerator(
        mixed_precision=precision,
        dynamo_backend=backend,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(folder.root), logging_dir=str(folder.logs)),
    )
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
