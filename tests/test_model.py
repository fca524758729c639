"""The model: shapes, causality, init, tying, loss conventions, cache, save/load, remote code, official interop."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hub import hub_reachable
from modeling_gpt2_repro import (
    GPT2ReproConfig,
    GPT2ReproForCausalLM,
    GPT2ReproModel,
    estimate_flops_per_token,
    transpose_conv1d_weights,
)

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64)


def tiny_model(seed=0, **overrides) -> GPT2ReproForCausalLM:
    torch.manual_seed(seed)
    return GPT2ReproForCausalLM(GPT2ReproConfig(**{**TINY, **overrides})).eval()


def tiny_official(seed=0, **overrides) -> GPT2LMHeadModel:
    """Stand-in for OpenAI's weights: a random stock GPT-2 of the tiny shape, dropout off."""
    torch.manual_seed(seed)
    cfg = GPT2Config(**{**TINY, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    with (
        torch.no_grad()
    ):  # GPT-2 init leaves biases and LayerNorms trivial; perturb them so interop is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def ids(batch=2, length=16, high=50257, seed=1):
    return torch.randint(0, high, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_embd=100, n_head=12), "not divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(n_positions=-5), "n_positions must be a positive integer"),
        (dict(vocab_size=50000), "smaller than the tokenizer's 50257"),
        (dict(dropout=1.5), "dropout must be in"),
    ],
)
def test_invalid_config_says_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPT2ReproConfig(**kwargs)


def test_config_defaults_are_gpt2_124m_and_round_trip(tmp_path):
    c = GPT2ReproConfig()
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size) == (
        12,
        12,
        768,
        1024,
        50304,
    )
    assert c.tokenizer_vocab_size == 50257 and c.tie_word_embeddings and c.dropout == 0.0
    assert c.hidden_size == 768 and c.num_hidden_layers == 12  # standard aliases
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GPT2ReproConfig)
    assert loaded.to_diff_dict() == c.to_diff_dict()


def test_parameter_count_of_124m():
    with torch.device("meta"):  # shapes only: no 124M init on the CPU
        official_vocab = GPT2ReproForCausalLM(GPT2ReproConfig(vocab_size=50257))
        padded = GPT2ReproForCausalLM(GPT2ReproConfig())
    assert official_vocab.num_parameters() == 124_439_808
    assert padded.num_parameters() == 124_475_904
    # nanoGPT's estimate for 124M at T=1024 is about 855M FLOPs per token
    assert estimate_flops_per_token(padded.config, 1024) == pytest.approx(855.4e6, rel=1e-3)
    assert (
        estimate_flops_per_token(padded.config, 1024)
        == 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 768 * 1024
    )


# -------------------------------------------------------------------------------------------- the network
def test_shapes_and_loss_at_init():
    model = tiny_model()
    x = ids()
    out = model(x, labels=x)
    assert out.logits.shape == (2, 16, 50304)
    assert out.loss.dtype == torch.float32
    # A fresh model spreads its mass over the 50257 real ids: loss close to ln(50257) = 10.82.
    assert abs(out.loss.item() - math.log(50257)) < 0.2


def test_padding_ids_never_win():
    model = tiny_model()
    logits = model(ids()).logits
    assert torch.isinf(logits[..., 50257:]).all() and torch.isfinite(logits[..., :50257]).all()
    with torch.no_grad():  # even if training pushed a padding row up, it stays out of decoding
        model.lm_head.weight[50300].fill_(5.0)
    out = model.generate(ids(1, 4), max_new_tokens=20, do_sample=True, top_k=0, temperature=2.0)
    assert out.max().item() < 50257


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causality(impl):
    model = tiny_model(attn_implementation=impl)
    assert model.config._attn_implementation == impl
    x = ids(1, 20)
    y = x.clone()
    y[0, 12] = (y[0, 12] + 1) % 50257
    a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, :12], b[:, :12])  # positions before the change see nothing of it
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_eager_and_sdpa_agree():
    eager, sdpa = tiny_model(attn_implementation="eager"), tiny_model(attn_implementation="sdpa")
    x = ids()
    torch.testing.assert_close(
        eager(x).logits[..., :50257], sdpa(x).logits[..., :50257], atol=1e-5, rtol=1e-5
    )


def test_weight_tying_is_one_storage(tmp_path):
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    cfg = GPT2ReproConfig(n_layer=4, n_head=4, n_embd=256, n_positions=256)
    model = GPT2ReproForCausalLM(cfg)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)  # 0.00707
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.count_nonzero(block.attn.c_attn.bias) == 0
        assert (
            torch.equal(block.ln_1.weight, torch.ones(256))
            and torch.count_nonzero(block.ln_1.bias) == 0
        )
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(model.transformer.wte.weight.mean().item()) < 1e-3


# ------------------------------------------------------------------------------------------------- the loss
def test_labels_and_shift_labels_conventions():
    model = tiny_model()
    x = ids(2, 17)
    inputs, targets = x[:, :-1], x[:, 1:]
    hf_style = model(x, labels=x).loss  # shifted inside
    direct = model(inputs, shift_labels=targets).loss  # already shifted by the loader
    logits = model(inputs).logits
    reference = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
    torch.testing.assert_close(direct, reference)
    torch.testing.assert_close(hf_style, reference)
    # Passing pre-shifted targets as labels would shift twice: a different, wrong number.
    assert not torch.allclose(model(inputs, labels=targets).loss, reference)


def test_ignored_targets_and_no_logits_for_training():
    model = tiny_model()
    x = ids(2, 17)
    inputs, targets = x[:, :-1], x[:, 1:].clone()
    targets[:, :8] = -100
    strided = torch.stack([targets, targets], dim=-1)[
        ..., 0
    ]  # the same values, every other element
    assert not strided.is_contiguous() and torch.equal(strided, targets)
    out = model(
        inputs, shift_labels=strided, return_logits=False
    )  # non-contiguous targets are fine
    assert out.logits is None
    logits = model(inputs).logits
    expected = F.cross_entropy(
        logits[:, 8:].reshape(-1, logits.size(-1)), targets[:, 8:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)


def test_loss_is_fp32_under_bf16_autocast_and_training_step_learns():
    model = tiny_model().train()
    x = ids(4, 33, high=200)  # a small id range: easy to overfit
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(inputs, shift_labels=targets, return_logits=False).loss
    assert first.dtype == torch.float32
    for _ in range(15):
        loss = model(inputs, shift_labels=targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first.item() - 2.0


# ------------------------------------------------------------------------------------------- bad input
def test_too_long_sequence_and_foreign_ids_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than the model's context n_positions=64"):
        model(ids(1, 65))
    bad = ids(1, 8)
    bad[0, 3] = 50304
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(bad)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model.generate(ids(1, 60), max_new_tokens=10, do_sample=False)


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_greedy_with_cache_equals_without(impl):
    model = tiny_model(attn_implementation=impl)
    prompt = ids(1, 6)
    cached = model.generate(prompt, max_new_tokens=40, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=40, do_sample=False, use_cache=False)
    assert cached.shape == (1, 46)
    assert torch.equal(cached, uncached)
    # and both equal a hand-written greedy loop over full forward passes
    seq = prompt
    for _ in range(40):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)


def test_left_padded_batch_generates_like_single_prompts():
    model = tiny_model()
    long_prompt, short_prompt = ids(1, 9, seed=3), ids(1, 5, seed=4)
    pad = torch.full((1, 4), model.config.eos_token_id)
    batch = torch.cat([long_prompt, torch.cat([pad, short_prompt], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
    alone_long = model.generate(long_prompt, max_new_tokens=12, do_sample=False)
    alone_short = model.generate(short_prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out[0, 9:], alone_long[0, 9:])
    assert torch.equal(out[1, 9:], alone_short[0, 5:])


# ------------------------------------------------------------------------------------------ save and load
def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "modeling_gpt2_repro.py"} <= set(
        os.listdir(tmp_path)
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is GPT2ReproForCausalLM
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    backbone = AutoModel.from_pretrained(tmp_path)
    assert type(backbone) is GPT2ReproModel
    torch.testing.assert_close(
        backbone(ids()).last_hidden_state, model.transformer(ids()).last_hidden_state
    )


def test_remote_code_load_in_a_fresh_process_without_the_project(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    x = ids(1, 10)
    expected = model.generate(x, max_new_tokens=8, do_sample=False)[0].tolist()
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):  # the project must not be importable here
            def find_spec(self, name, path=None, target=None):
                if name in ("modeling_gpt2_repro", "gpt2_tokenizer"):
                    raise ImportError("project blocked: " + name)
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(ckpt)!r})
            raise SystemExit("loaded without trust_remote_code")
        except ValueError:
            pass
        m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        out = m.generate(torch.tensor([{x[0].tolist()}]), max_new_tokens=8, do_sample=False)
        print("GEN", out[0].tolist())
        print("BACKBONE", type(AutoModel.from_pretrained({str(ckpt)!r}, trust_remote_code=True)).__name__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"GEN {expected}" in proc.stdout
    assert "BACKBONE GPT2ReproModel" in proc.stdout


# ------------------------------------------------------------------------------------ official interop
def test_from_official_gpt2_matches_logits_and_generations(tmp_path):
    official = tiny_official()
    x = ids()
    for source in (official, tmp_path):  # a loaded GPT2LMHeadModel, and a folder of one
        if source is tmp_path:
            official.save_pretrained(tmp_path)
        ours = GPT2ReproForCausalLM.from_official_gpt2(source)
        assert ours.config.vocab_size == 50257
        torch.testing.assert_close(ours(x).logits, official(x).logits, atol=1e-5, rtol=0)
        prompt = x[:1, :5]
        assert torch.equal(
            ours.generate(prompt, max_new_tokens=20, do_sample=False),
            official.generate(prompt, max_new_tokens=20, do_sample=False),
        )
    padded = GPT2ReproForCausalLM.from_official_gpt2(official, vocab_size=50304)
    torch.testing.assert_close(padded(x).logits[..., :50257], official(x).logits, atol=1e-5, rtol=0)


def test_to_official_gpt2_is_a_stock_model_with_identical_outputs(tmp_path):
    ours = tiny_model()
    official = ours.to_official_gpt2()
    assert type(official) is GPT2LMHeadModel and official.config.vocab_size == 50257
    x = ids()
    torch.testing.assert_close(official(x).logits, ours(x).logits[..., :50257], atol=1e-5, rtol=0)
    official.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers, no remote code
    assert type(reloaded) is GPT2LMHeadModel
    prompt = x[:1, :5]
    assert torch.equal(
        reloaded.generate(prompt, max_new_tokens=20, do_sample=False),
        ours.generate(prompt, max_new_tokens=20, do_sample=False),
    )
    # and back again: the round trip is exact
    again = GPT2ReproForCausalLM.from_official_gpt2(reloaded, vocab_size=50304)
    for key, value in again.state_dict().items():
        assert torch.equal(value[:50257], ours.state_dict()[key][:50257]), key


def test_conv1d_transpose_is_its_own_inverse():
    sd = tiny_official().state_dict()
    back = transpose_conv1d_weights(transpose_conv1d_weights(sd))
    assert all(torch.equal(sd[k], back[k]) for k in sd)
    assert transpose_conv1d_weights(sd)["transformer.h.0.attn.c_attn.weight"].shape == (192, 64)


def test_unconvertible_official_model_is_refused():
    torch.manual_seed(0)
    odd = GPT2LMHeadModel(GPT2Config(**TINY, activation_function="relu"))
    with pytest.raises(ValueError, match="activation_function"):
        GPT2ReproForCausalLM.from_official_gpt2(odd)
    with pytest.raises(TypeError):
        GPT2ReproForCausalLM.from_official_gpt2(42)


@pytest.mark.slow
@pytest.mark.skipif(not hub_reachable(), reason="the Hugging Face Hub is unreachable (offline)")
def test_real_openai_gpt2_from_the_hub():
    official = GPT2LMHeadModel.from_pretrained("gpt2", dtype=torch.float32).eval()
    ours = GPT2ReproForCausalLM.from_official_gpt2("gpt2")
    x = ids(1, 32)
    torch.testing.assert_close(ours(x).logits, official(x).logits, atol=1e-4, rtol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    x = ids(2, 17)
    model(x[:, :-1], shift_labels=x[:, 1:]).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable({"use_reentrant": False})  # transformers 5's name for it
    assert model.is_activation_checkpointing
    model(x[:, :-1], shift_labels=x[:, 1:]).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], msg=name)
