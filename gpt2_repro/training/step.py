"""One optimizer step of the training loop: accumulation, clipping, the divergence guard's test, the stop flag; and
the step's starting point (`StepStart`), where a stop inside the step rewinds to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from accelerate import Accelerator

from .stopping import StopRequest


class StepResult(NamedTuple):
    """What one optimizer step reports; every field is the same on every process."""

    loss: float  # mean over every micro-batch of every process; NaN or inf when the step diverged
    grad_norm: float  # global gradient norm before clipping
    skipped: bool  # no update: a non-finite loss or norm, or a gradient-scaler overflow
    bad: bool  # skipped for a non-finite loss or norm: what the divergence guard counts
    stop: bool  # some process was asked to stop (StopRequest)
    abandoned: bool = False  # stopped at a micro-batch boundary: nothing of this step was applied or logged


@dataclass(frozen=True)
class StepStart:
    """Where an optimizer step starts: the data source's position and the torch RNG states (dropout draws from
    them). A step abandoned at a micro-batch boundary leaves the weights and the optimizer as they were; restoring
    these too makes the saved state exactly that of the last completed step, so the resume is exact."""

    position: dict  # the data source's state_dict
    cpu_rng: torch.Tensor
    cuda_rng: list  # one state per visible CUDA device ([] on a CPU machine)

    @classmethod
    def take(cls, source) -> StepStart:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return cls(source.state_dict(), torch.get_rng_state(), cuda)

    def restore_rng(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def train_step(
    accelerator: Accelerator, model, optimizers: list, source, grad_clip: float, stop: StopRequest | None = None
) -> StepResult:
    """One optimizer step over `gradient_accumulation_steps` micro-batches per process.

    `optimizers` (AdamW, or AdamW + Muon) have their LRs set before (set_lrs). The update is applied only when the
    loss and the gradient norm are finite. Both are known after the step's one device sync (placed before the
    optimizers' step, so the guard costs no extra sync), and both are the same on every process (the loss is
    reduced, the norm is that of the all-reduced gradients): every process decides alike. Whether `stop` was
    requested (by now, on any process) rides along in the loss reduction, so all processes agree to stop after the
    same step. Before each micro-batch the processes agree whether one was asked to stop since (StopRequest.agreed):
    then the step is abandoned there, its gradients dropped, and StepResult.abandoned says so.
    """
    accum = accelerator.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=accelerator.device)
    for _ in range(accum):
        if stop is not None and stop.agreed():  # a micro-batch boundary: stop without finishing the step
            model.zero_grad(set_to_none=True)  # (accelerate's optimizers zero nothing amid an accumulation)
            return StepResult(math.nan, math.nan, skipped=True, bad=False, stop=True, abandoned=True)
        x, y = source.next_batch()  # (B, T) int64 each: this rank's share of the global batch
        x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):  # no DDP all-reduce until the last micro-step
            loss = model(input_ids=x, shift_labels=y, return_logits=False).loss  # fp32 scalar
            accelerator.backward(loss)  # scaled by 1 / accum inside
            loss_sum += loss.detach()
    # The last micro-step synced the gradients (accelerator.sync_gradients stays True until the next accumulate).
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    flag = torch.full((), float(stop is not None and stop.requested), device=accelerator.device)
    mean_loss, stop_flag = accelerator.reduce(torch.stack([loss_sum / accum, flag]), "mean")
    grad_norm = getattr(grad_norm, "full_tensor", lambda: grad_norm)()  # FSDP2: a DTensor
    # The step's one device sync: the loss, the gradient norm and the stop flag together.
    loss_value, norm_value, stop_value = torch.stack([mean_loss, grad_norm.detach().float(), stop_flag]).tolist()
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    # fp16: a GradScaler skips overflowing steps itself and lowers its scale
    scaler = accelerator.scaler is not None
    skipped = not finite
    for optimizer in optimizers:
        if finite or scaler:
            optimizer.step()
        skipped = skipped or (scaler and optimizer.step_was_skipped)
        optimizer.zero_grad(set_to_none=True)  # the gradients of a skipped step go too
    bad = not math.isfinite(loss_value) or (not finite and not scaler)
    return StepResult(loss_value, norm_value, skipped, bad, stop_value > 0)
