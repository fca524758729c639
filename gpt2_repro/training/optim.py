"""Optimizers and LR schedules: AdamW (the GPT-2 recipe) or Muon + AdamW (the fast recipe), each group following
its own peak down the cosine or warmup-stable-decay schedule."""

from __future__ import annotations

import math
import re

import torch
from accelerate.utils import DistributedType

from modeling_gpt2_repro import CONV1D_WEIGHTS

from ..base.config import OptimConfig, TrainConfig
from ..base.errors import ConfigError

# The matrices torch.optim.Muon trains with optimizer=muon: the blocks' attention and MLP weights (the ones the
# official checkpoints store in Conv1D layout).
MUON_MATRICES = CONV1D_WEIGHTS


def muon_param_names(model: torch.nn.Module) -> set[str]:
    """Names of the 2-D weight matrices inside the transformer blocks (transformer.h.<i>.<MUON_MATRICES>)."""
    in_block = re.compile(r"(?:.+\.)?h\.\d+\.(.+)")
    return {
        name
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and (m := in_block.fullmatch(name)) and m[1] in MUON_MATRICES
    }


def zero_output_projections(model: torch.nn.Module) -> None:
    """Zero the weights of every block's residual output projections (attn.c_proj, mlp.c_proj: the layers the model
    flags RESIDUAL_SCALE_INIT for its own init; biases are zero already): each block then adds nothing to the
    residual stream at step 0, and the logits are ln_f(wte + wpe) @ wte^T. Gradients still reach them (their input
    is not zero); the matrices before them get none until they move off zero."""
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                module.weight.zero_()


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """[AdamW], or with optimizer=muon [AdamW, Muon]: every trainable parameter in exactly one group.

    AdamW: weight decay on 2-D+ tensors (matmul weights, embeddings) only, not on biases and LayerNorms.
    Muon (PyTorch's torch.optim.Muon; under a process group muon.DistributedMuon, its arithmetic with the
    orthogonalizations shared among the processes): the blocks' attention and MLP matrices. AdamW keeps the rest, the
    token embedding included, which is also the tied LM head (named_parameters lists a shared tensor once).
    """
    optim = cfg.optim
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_names = muon_param_names(model) if optim.optimizer == "muon" else set()
    rest = [p for n, p in named if n not in muon_names]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas = (optim.beta1, optim.beta2)
    fused = device.type == "cuda" or None  # one fused kernel on CUDA; None: PyTorch's default (foreach) elsewhere
    (adamw_peak, _), *muon_peak = schedule_peaks(optim)
    adamw = torch.optim.AdamW(groups, lr=adamw_peak, betas=betas, eps=optim.eps, fused=fused)
    if optim.optimizer != "muon":
        return [adamw]
    if device.type == "cpu":
        orthogonalize_in_fp32_on_cpu()
    muon_class = torch.optim.Muon
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from .muon import DistributedMuon as muon_class  # each process orthogonalizes its share
    muon = muon_class(
        [p for n, p in named if n in muon_names],
        lr=muon_peak[0][0],
        weight_decay=optim.muon_weight_decay,
        momentum=optim.muon_momentum,
        nesterov=optim.muon_nesterov,
        ns_steps=optim.muon_ns_steps,
        adjust_lr_fn=optim.muon_adjust_lr_fn,
    )
    return [adamw, muon]


# -------------------------------------------------------------------------------------------------- schedules


def lr_at(step: int, optim: OptimConfig, peak: float | None = None, floor: float | None = None) -> float:
    """LR for optimizer step `step` (0-based) of a param group scheduled from `peak` down to `floor`.

    The defaults are AdamW's (max_lr, min_lr); the Muon group passes (muon_lr, muon_lr * min_lr / max_lr).
    schedule=cosine: linear warmup to peak, cosine to floor at max_steps, then flat.
    schedule=wsd: linear warmup to peak, constant, then down to floor over the last `optim.decay_steps`
    steps (decay_shape: linear, or 1 - sqrt of the cool-down's progress), flat after max_steps. Only the
    cool-down depends on max_steps, so a run can be extended (resume a checkpoint taken before the cool-down with
    a larger --max_steps) or cut short the same way.

    A pure function of the step, so a resumed run needs nothing but the step count. The trainer sets it on the
    optimizers' param_groups once per optimizer step rather than through an LR scheduler passed to
    `accelerator.prepare`, because accelerate steps a prepared scheduler once per process at every optimizer
    step (with 8 GPUs the warmup would end 8x too early). Warmup reaches peak at step warmup_steps - 1, as in
    build-nanogpt.
    """
    peak = optim.max_lr if peak is None else peak
    floor = optim.min_lr if floor is None else floor
    if step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    if step >= optim.max_steps:
        return floor
    if optim.schedule == "wsd":
        decay = optim.decay_steps
        if step < optim.max_steps - decay:
            return peak
        if optim.decay_shape == "sqrt":  # Hagele et al. 2024 found 1 - sqrt(progress) beat linear for wsd
            return floor + (peak - floor) * (1.0 - math.sqrt(1.0 - (optim.max_steps - step) / decay))
        return floor + (peak - floor) * (optim.max_steps - step) / decay  # peak at its first step
    progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)  # 0 -> 1
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def schedule_peaks(optim) -> list[tuple[float, float]]:
    """(peak, floor) of each optimizer of build_optimizers: AdamW's, then Muon's (the same final fraction).

    Read from the config at every step, not from the param groups (a resume restores those from the
    checkpoint), so a resume with other LRs takes them.
    """
    adamw = (optim.max_lr, optim.min_lr)
    muon = (optim.muon_lr, optim.muon_lr * optim.min_lr / optim.max_lr)
    return [adamw, muon] if optim.optimizer == "muon" else [adamw]


def muon_momentum_at(step: int, optim: OptimConfig) -> float:
    """Muon's momentum for optimizer step `step`: linear from muon_momentum_start to muon_momentum over the first
    muon_momentum_warmup_steps (a short memory while the gradients change fast), then constant."""
    if step >= optim.muon_momentum_warmup_steps:
        return optim.muon_momentum
    start, end = optim.muon_momentum_start, optim.muon_momentum
    return start + (end - start) * step / optim.muon_momentum_warmup_steps


def set_lrs(optimizers: list, step: int, optim) -> dict[str, float]:
    """Every param group's LR (and Muon's momentum, when it warms up) for optimizer step `step`; returns {"lr":
    AdamW's, "muon_lr": Muon's} and, during a momentum warmup, "muon_momentum"."""
    lrs = {}
    for name, optimizer, (peak, floor) in zip(("lr", "muon_lr"), optimizers, schedule_peaks(optim), strict=False):
        lrs[name] = lr_at(step, optim, peak, floor)
        for group in optimizer.param_groups:
            group["lr"] = lrs[name]
    if len(optimizers) > 1 and optim.muon_momentum_warmup_steps:
        lrs["muon_momentum"] = muon_momentum_at(step, optim)
        for group in optimizers[1].param_groups:
            group["momentum"] = lrs["muon_momentum"]
    return lrs


# ------------------------------------------------------------------------------------------------------- Muon


_TORCH_NEWTON_SCHULZ = torch.optim._muon._zeropower_via_newtonschulz


def _newton_schulz(grad, ns_coefficients, ns_steps: int, eps: float):
    """torch.optim.Muon's orthogonalization, the same quintic Newton-Schulz iteration, in fp32 on the CPU.

    PyTorch runs it in bfloat16, which GPUs are fast at. A CPU without native bf16 matrix units is 20-40x
    slower in bf16 than in fp32 (measured on a 2-core x86 VM: (768, 256) @ (256, 768) 503 ms vs 14 ms), which
    made a Muon step of a 6x256 GPT-2 cost over a minute. Elsewhere, PyTorch's own function runs unchanged.
    """
    if grad.device.type != "cpu":
        return _TORCH_NEWTON_SCHULZ(grad, ns_coefficients, ns_steps, eps)
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x  # (rows <= cols): the Gram matrix is the small side
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(grad.dtype)


def orthogonalize_in_fp32_on_cpu() -> None:
    """Make torch.optim.Muon orthogonalize CPU gradients in fp32 (see _newton_schulz); idempotent."""
    torch.optim._muon._zeropower_via_newtonschulz = _newton_schulz


def check_optimizer_support(cfg: TrainConfig, distributed_type: DistributedType, fsdp_version: int = 2) -> None:
    """Refuse what Muon cannot do: FSDP's version 1 flattens the weights into 1-D shards, where Muon needs each
    weight's matrix (FSDP2 keeps it: muon.DistributedMuon gathers it whole to orthogonalize)."""
    if cfg.optim.optimizer == "muon" and distributed_type == DistributedType.FSDP and fsdp_version != 2:
        raise ConfigError(
            "optimizer=muon needs fsdp_version: 2 under FSDP: version 1 flattens the weight matrices Muon "
            "orthogonalizes. Set fsdp_config: {fsdp_version: 2, ...} in the accelerate config, use DDP, or "
            "--optimizer adamw."
        )
