"""training/step.py: one optimizer step with a real one-process Accelerator: accumulation, clipping, the skipped
steps the divergence guard counts, the stop flag."""

import math

import numpy as np
import pytest
import torch

from gpt2_repro.base.config import load_config
from gpt2_repro.data.shard_loader import TokenShardLoader
from gpt2_repro.data.shards import write_shard
from gpt2_repro.training.optim import build_optimizers
from gpt2_repro.training.step import train_step
from gpt2_repro.training.stopping import StopRequest
from synthetic import learnable_tokens, tiny_repro

B, T, ACCUM = 2, 16, 3


@pytest.fixture
def shards(tmp_path):
    write_shard(tmp_path / "t_train_000001.bin", learnable_tokens(4000, seed=1))
    return tmp_path


def _setup(shards, scaler=False):
    """(accelerator, prepared model, prepared optimizers, source): a 2-layer model, AdamW at a fixed LR."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    if scaler:  # fp16's gradient scaler: accelerate makes one on GPUs only; its CPU twin behaves the same
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    model = tiny_repro(seed=3, n_positions=T).train()
    cfg = load_config(None, {"max_lr": "1e-3", "min_lr": "1e-4"})
    model, *optimizers = accelerator.prepare(model, *build_optimizers(model, cfg, accelerator.device))
    return accelerator, model, optimizers, TokenShardLoader(shards, batch_size=B, seq_len=T, shuffle=False)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_finite_step_equals_one_step_on_the_whole_batch(shards):
    """ACCUM micro-batches of B rows: the loss is their mean and the update that of one batch of ACCUM * B rows."""
    accelerator, model, optimizers, source = _setup(shards)
    result = train_step(accelerator, model, optimizers, source, grad_clip=1.0)
    assert not (result.skipped or result.bad or result.stop) and math.isfinite(result.grad_norm)

    whole = TokenShardLoader(shards, batch_size=ACCUM * B, seq_len=T, shuffle=False)
    x, y = whole.next_batch()
    twin = tiny_repro(seed=3, n_positions=T).train()
    losses = [twin(input_ids=x[i : i + B], shift_labels=y[i : i + B]).loss for i in range(0, ACCUM * B, B)]
    assert result.loss == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)
    loss = twin(input_ids=x, shift_labels=y).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    assert result.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    (opt,) = build_optimizers(twin, load_config(None, {"max_lr": "1e-3", "min_lr": "1e-4"}), torch.device("cpu"))
    opt.step()
    for name, p in model.named_parameters():  # Adam moves each weight by about its LR, 1e-3: a wrong update shows
        torch.testing.assert_close(p, dict(twin.named_parameters())[name], rtol=0, atol=1e-5)


def test_a_non_finite_loss_or_gradient_skips_the_update_and_counts_as_bad(shards):
    accelerator, model, optimizers, source = _setup(shards)
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = float("nan")  # every forward reads it: the loss is NaN
    broken = _params(model)
    result = train_step(accelerator, model, optimizers, source, grad_clip=1.0)
    assert result.skipped and result.bad and math.isnan(result.loss)
    assert all(torch.equal(p, broken[n]) or n.endswith("wte.weight") for n, p in _params(model).items())
    assert all(p.grad is None for p in model.parameters())  # a skipped step's gradients are dropped too

    accelerator, model, optimizers, source = _setup(shards)
    before = _params(model)
    hook = model.lm_head.weight.register_hook(lambda g: g * float("inf"))  # a finite loss, an infinite norm
    result = train_step(accelerator, model, optimizers, source, grad_clip=1.0)
    hook.remove()
    assert math.isfinite(result.loss) and not math.isfinite(result.grad_norm) and result.skipped and result.bad
    assert all(torch.equal(p, before[n]) for n, p in _params(model).items())


def test_with_a_gradient_scaler_an_overflow_is_skipped_but_not_counted(shards):
    """fp16: the scaler skips an overflowing step and lowers its scale itself; a finite loss then is no divergence."""
    accelerator, model, optimizers, source = _setup(shards, scaler=True)
    before = _params(model)
    hook = model.lm_head.weight.register_hook(lambda g: g * float("inf"))
    result = train_step(accelerator, model, optimizers, source, grad_clip=1.0)
    hook.remove()
    assert result.skipped and not result.bad and math.isfinite(result.loss)
    assert all(torch.equal(p, before[n]) for n, p in _params(model).items())
    assert accelerator.scaler.get_scale() < 2.0**4
    result = train_step(accelerator, model, optimizers, source, grad_clip=1.0)
    assert not result.skipped and not result.bad
    assert any(not torch.equal(p, before[n]) for n, p in _params(model).items())


def test_a_stop_before_a_micro_batch_abandons_the_step_and_one_during_the_last_rides_along(shards):
    """Asked before a micro-batch: the step stops there, nothing of it applied (its gradients dropped). Asked
    during the step's last micro-batch: the step completes and its result says stop."""
    accelerator, model, optimizers, source = _setup(shards)
    stop = StopRequest()
    assert not train_step(accelerator, model, optimizers, source, 1.0, stop).stop
    before, served = _params(model), []

    class AskedAt:  # the real source; the stop arrives while the given micro-batch is read
        def __init__(self, when):
            self.when = when

        def next_batch(self):
            served.append(1)
            if len(served) == self.when:
                stop.request("SIGTERM received")
            return source.next_batch()

    result = train_step(accelerator, model, optimizers, AskedAt(when=2), 1.0, stop)
    assert result.abandoned and result.stop and len(served) == 2  # the third micro-batch was never read
    assert all(torch.equal(p, before[n]) for n, p in _params(model).items())
    assert all(p.grad is None for p in model.parameters())

    accelerator, model, optimizers, source = _setup(shards)
    stop, served, before = StopRequest(), [], _params(model)
    result = train_step(accelerator, model, optimizers, AskedAt(when=ACCUM), 1.0, stop)
    assert result.stop and not result.abandoned and not result.skipped and np.isfinite(result.loss)
    assert any(not torch.equal(p, before[n]) for n, p in _params(model).items())  # the step it was on is done


def test_the_start_of_a_step_restores_its_rng_states():
    from gpt2_repro.training.step import StepStart

    class Position:
        def state_dict(self):
            return {"consumed_windows": 7}

    start = StepStart.take(Position())
    drawn = torch.rand(3)
    torch.rand(5)  # a half-done step's dropout draws
    start.restore_rng()
    assert torch.equal(torch.rand(3), drawn) and start.position == {"consumed_windows": 7}
