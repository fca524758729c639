"""training/optim.py: AdamW/Muon parameter groups, each group's schedule (cosine, wsd), Muon's refusal and CPU
override."""

from pathlib import Path

import pytest
import torch

from gpt2_repro.base.config import OptimConfig, load_config
from gpt2_repro.base.errors import ConfigError
from gpt2_repro.training.optim import lr_at

ROOT = Path(__file__).resolve().parents[1]


def test_lr_schedule_boundaries():
    o = OptimConfig(max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
    assert lr_at(0, o) == pytest.approx(6e-4 / 715)
    assert lr_at(713, o) == pytest.approx(6e-4 * 714 / 715)
    assert lr_at(714, o) == pytest.approx(6e-4)  # warmup ends at max_lr
    assert lr_at(715, o) == pytest.approx(6e-4)  # cosine starts at max_lr
    assert lr_at((715 + 19073) // 2, o) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)  # half-way
    assert 6e-5 < lr_at(19072, o) < 6e-5 * 1.0001
    assert lr_at(19073, o) == 6e-5 and lr_at(50000, o) == 6e-5  # flat at min_lr after max_steps
    lrs = [lr_at(s, o) for s in range(0, 19100, 7)]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))
    assert lr_at(0, OptimConfig(max_lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=10)) == 1e-3


def test_wsd_schedule_boundaries_and_it_follows_max_steps():
    o = OptimConfig(schedule="wsd", max_steps=100, warmup_steps=10, decay_fraction=0.4, max_lr=1e-2, min_lr=1e-3)
    assert lr_at(0, o) == pytest.approx(1e-3)  # warmup: peak * 1 / 10
    assert lr_at(9, o) == 1e-2 and lr_at(10, o) == 1e-2 and lr_at(59, o) == 1e-2  # constant
    assert lr_at(60, o) == pytest.approx(1e-2)  # the cool-down's first step, then linear
    assert lr_at(80, o) == pytest.approx((1e-2 + 1e-3) / 2)
    assert 1e-3 < lr_at(99, o) < 1e-2 and lr_at(100, o) == 1e-3 and lr_at(500, o) == 1e-3
    assert lr_at(80, o, peak=0.02, floor=0.002) == pytest.approx(0.011)  # another group's own peak
    longer = OptimConfig(**{**o.__dict__, "max_steps": 200})  # --max_steps 200: cool-down from 120
    assert lr_at(100, longer) == 1e-2 and lr_at(160, longer) == pytest.approx((1e-2 + 1e-3) / 2)
    assert [lr_at(s, o) for s in range(60)] == [lr_at(s, longer) for s in range(60)]  # extendable


def test_wsd_sqrt_cool_down_drops_first_and_keeps_the_same_ends():
    linear = OptimConfig(schedule="wsd", max_steps=100, warmup_steps=10, decay_fraction=0.4, max_lr=1e-2, min_lr=1e-3)
    sqrt = OptimConfig(**{**linear.__dict__, "decay_shape": "sqrt"})
    assert [lr_at(s, sqrt) for s in range(61)] == [lr_at(s, linear) for s in range(61)]  # same until the cool-down
    assert lr_at(70, sqrt) == pytest.approx(1e-3 + 9e-3 * (1 - 0.5))  # a quarter of the way: 1 - sqrt(1/4)
    assert all(lr_at(s, sqrt) < lr_at(s, linear) for s in range(61, 100))  # below linear inside the cool-down
    assert lr_at(100, sqrt) == 1e-3 and lr_at(101, sqrt) == 1e-3


def test_muon_momentum_warms_up_and_is_left_alone_when_it_does_not():
    from gpt2_repro.training.optim import build_optimizers, set_lrs

    overrides = {"max_steps": 100, "warmup_steps": 10, "muon_momentum_warmup_steps": 40, "muon_momentum_start": 0.85}
    cfg = load_config(ROOT / "configs" / "tiny_fast.yaml", overrides)
    adamw, muon = build_optimizers(_tiny_model(), cfg, torch.device("cpu"))
    momenta = {step: set_lrs([adamw, muon], step, cfg.optim)["muon_momentum"] for step in (0, 20, 40, 99)}
    assert momenta == pytest.approx({0: 0.85, 20: 0.90, 40: 0.95, 99: 0.95})
    assert muon.param_groups[0]["momentum"] == 0.95 and "momentum" not in adamw.param_groups[0]
    set_lrs([adamw, muon], 0, cfg.optim)  # a resume sets it again from the step alone
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.85)
    plain = load_config(ROOT / "configs" / "tiny_fast.yaml", {"max_steps": 100, "warmup_steps": 10})
    adamw, muon = build_optimizers(_tiny_model(), plain, torch.device("cpu"))
    assert "muon_momentum" not in set_lrs([adamw, muon], 0, plain.optim)
    assert muon.param_groups[0]["momentum"] == plain.optim.muon_momentum


def test_cosine_ignores_the_group_arguments_it_defaults_to():
    o = OptimConfig(max_steps=50, warmup_steps=5, max_lr=3e-3, min_lr=3e-4)
    assert all(lr_at(step, o) == lr_at(step, o, 3e-3, 3e-4) for step in range(0, 60, 3))


def _tiny_model(n_layer=2):
    from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM

    config = GPT2ReproConfig(n_layer=n_layer, n_head=2, n_embd=32, n_positions=16)
    return GPT2ReproForCausalLM(config)


def test_muon_and_adamw_groups_hold_every_parameter_once():
    from gpt2_repro.training.optim import MUON_MATRICES, build_optimizers

    model = _tiny_model()
    cfg = load_config(ROOT / "configs" / "tiny_fast.yaml")
    adamw, muon = build_optimizers(model, cfg, torch.device("cpu"))
    groups = [g for opt in (adamw, muon) for g in opt.param_groups]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # the tied weight counts once
    assert model.lm_head.weight is model.transformer.wte.weight
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)} <= adamw_ids
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = sorted(names[id(p)] for p in muon.param_groups[0]["params"])
    expected = sorted(f"transformer.h.{i}.{m}" for i in range(2) for m in MUON_MATRICES)
    assert muon_names == expected
    decayed, plain = adamw.param_groups
    assert decayed["weight_decay"] == cfg.optim.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert muon.defaults["adjust_lr_fn"] == cfg.optim.muon_adjust_lr_fn
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    (alone,) = build_optimizers(model, tiny, torch.device("cpu"))
    assert isinstance(alone, torch.optim.AdamW) and len(alone.param_groups) == 2


def test_each_optimizer_follows_the_schedule_from_its_own_peak():
    from gpt2_repro.training.optim import build_optimizers, set_lrs

    cfg = load_config(ROOT / "configs" / "tiny_fast.yaml", {"max_steps": 100, "warmup_steps": 10})
    optimizers = build_optimizers(_tiny_model(), cfg, torch.device("cpu"))
    optim = cfg.optim
    assert set_lrs(optimizers, 30, optim) == {"lr": optim.max_lr, "muon_lr": optim.muon_lr}
    assert optimizers[1].param_groups[0]["lr"] == optim.muon_lr
    end = set_lrs(optimizers, 100, optim)
    assert end["lr"] == optim.min_lr
    assert end["muon_lr"] == pytest.approx(optim.muon_lr * optim.min_lr / optim.max_lr)


def test_muon_is_refused_under_fsdp1_and_allowed_with_fsdp2_and_ddp():
    """FSDP1 flattens the matrices Muon orthogonalizes; FSDP2 keeps them (training.muon gathers them whole)."""
    from accelerate import DistributedType

    from gpt2_repro.training.optim import check_optimizer_support

    fast = load_config(ROOT / "configs" / "tiny_fast.yaml")
    with pytest.raises(ConfigError, match="optimizer=muon needs fsdp_version: 2 under FSDP.*--optimizer adamw"):
        check_optimizer_support(fast, DistributedType.FSDP, fsdp_version=1)
    check_optimizer_support(fast, DistributedType.FSDP, fsdp_version=2)
    check_optimizer_support(fast, DistributedType.MULTI_GPU, fsdp_version=1)
    check_optimizer_support(load_config(ROOT / "configs" / "tiny.yaml"), DistributedType.FSDP, fsdp_version=1)


def test_muon_orthogonalizes_cpu_gradients_in_fp32_like_pytorch_does_in_bf16():
    """The CPU's fp32 Newton-Schulz is the same function as PyTorch's bf16 one, to bf16 precision."""
    from gpt2_repro.training.optim import _TORCH_NEWTON_SCHULZ, _newton_schulz, build_optimizers

    coefficients = (3.4445, -4.7750, 2.0315)
    for shape in [(96, 32), (32, 96), (64, 64)]:
        grad = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        ours = _newton_schulz(grad, coefficients, 5, 1e-7)
        torch_bf16 = _TORCH_NEWTON_SCHULZ(grad, coefficients, 5, 1e-7).float()
        assert ours.dtype == grad.dtype and ours.shape == grad.shape
        assert (ours - torch_bf16).norm() / torch_bf16.norm() < 2e-2
    model = _tiny_model()
    cfg = load_config(ROOT / "configs" / "tiny_fast.yaml")
    build_optimizers(model, cfg, torch.device("cpu"))
    assert torch.optim._muon._zeropower_via_newtonschulz is _newton_schulz  # what Muon calls


def test_zero_output_projections_make_every_block_the_identity():
    """With the projections at zero the logits are the embeddings' alone: ln_f(wte + wpe) @ wte^T. One optimizer step
    then moves the projections off zero, and the matrices before them stay put that step (no gradient reaches them)."""
    from gpt2_repro.training.optim import build_optimizers, zero_output_projections

    model = _tiny_model()
    zero_output_projections(model)
    zeroed = sorted(n for n, p in model.named_parameters() if p.dim() == 2 and not p.any())
    assert zeroed == sorted(f"transformer.h.{i}.{m}.c_proj.weight" for i in range(2) for m in ("attn", "mlp"))
    real = model.config.tokenizer_vocab_size  # the padding ids' logits are masked
    ids = torch.randint(0, real, (2, 16))
    t = model.transformer
    hidden = t.ln_f(t.wte(ids) + t.wpe(torch.arange(16)))  # (2, 16, 32)
    torch.testing.assert_close(model(ids).logits[..., :real], (hidden @ t.wte.weight.T)[..., :real])

    cfg = load_config(ROOT / "configs" / "tiny_fast.yaml")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(ids, labels=ids).loss.backward()
    for opt in build_optimizers(model, cfg, torch.device("cpu")):
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert set(zeroed) <= moved and not any(n.endswith(("c_attn.weight", "c_fc.weight")) for n in moved)
