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
from transformers.cache_utils import DynamicCache, StaticCache

from gpt2_repro import register_auto_classes
from gpt2_repro.base.machine import hub_reachable
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
    with torch.no_grad():  # GPT-2 init leaves biases and LayerNorms trivial; perturb them so interop is tested
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
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size) == (12, 12, 768, 1024, 50304)
    assert c.tokenizer_vocab_size == 50257 and c.tie_word_embeddings and c.dropout == 0.0
    assert c.hidden_size == 768 and c.num_hidden_layers == 12  # standard aliases
    c.save_pretrained(tmp_path)
    register_auto_classes()  # in-process: loads without trust_remote_code
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
    assert estimate_flops_per_token(padded.config, 1024) == 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 768 * 1024


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
    assert (logits[..., 50257:] == torch.finfo(logits.dtype).min).all() and torch.isfinite(logits).all()
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
    torch.testing.assert_close(eager(x).logits[..., :50257], sdpa(x).logits[..., :50257], atol=1e-5, rtol=1e-5)


def test_weight_tying_is_one_storage(tmp_path):
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    register_auto_classes()
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
        assert torch.equal(block.ln_1.weight, torch.ones(256)) and torch.count_nonzero(block.ln_1.bias) == 0
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
    strided = torch.stack([targets, targets], dim=-1)[..., 0]  # the same values, every other element
    assert not strided.is_contiguous() and torch.equal(strided, targets)
    out = model(inputs, shift_labels=strided, return_logits=False)  # non-contiguous targets are fine
    assert out.logits is None
    logits = model(inputs).logits
    expected = F.cross_entropy(logits[:, 8:].reshape(-1, logits.size(-1)), targets[:, 8:].reshape(-1))
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
    assert {"config.json", "model.safetensors", "modeling_gpt2_repro.py"} <= set(os.listdir(tmp_path))
    register_auto_classes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is GPT2ReproForCausalLM
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    backbone = AutoModel.from_pretrained(tmp_path)
    assert type(backbone) is GPT2ReproModel
    torch.testing.assert_close(backbone(ids()).last_hidden_state, model.transformer(ids()).last_hidden_state)


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
                if name == "modeling_gpt2_repro" or name.split(".")[0] == "gpt2_repro":
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
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
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
    with pytest.raises(TypeError, match="source must be a Hub id, a folder or a GPT2LMHeadModel, not int"):
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


# ------------------------------------------------------------------- outputs as every transformers model gives
def _left_padded(batch=3, length=9, pad=4):
    """A batch whose last row is left-padded by `pad` positions, and its attention mask."""
    x = ids(batch, length, seed=5)
    mask = torch.ones_like(x)
    mask[-1, :pad] = 0
    return x, mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hidden_states_and_attentions_equal_stock_gpt2(impl):
    """output_hidden_states / output_attentions as GPT2LMHeadModel gives them, on the same (converted) weights:
    n_layer + 1 hidden states (the last after ln_f), n_layer attention maps; sdpa falls back to eager for them."""
    official = tiny_official(attn_implementation="eager")
    ours = GPT2ReproForCausalLM.from_official_gpt2(official)
    ours.set_attn_implementation(impl)
    assert ours.config._attn_implementation == impl
    x, mask = _left_padded()
    want = official(x, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    got = ours(x, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == ours.config.n_layer + 1 == len(want.hidden_states)
    assert len(got.attentions) == ours.config.n_layer == len(want.attentions)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(got.attentions, want.attentions, strict=True):
        assert a.shape == (3, TINY["n_head"], 9, 9)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    real = mask.bool()  # padding positions see no key at all: sdpa and eager fill them differently
    plain_last = ours.transformer(x, attention_mask=mask)[0]
    torch.testing.assert_close(got.hidden_states[-1][real], plain_last[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    # Asking for nothing returns nothing more, as stock GPT-2 does.
    plain = ours(x, attention_mask=mask)
    assert plain.hidden_states is None and plain.attentions is None


def test_return_dict_false_gives_stock_gpt2_tuples():
    official = tiny_official()
    ours = GPT2ReproForCausalLM.from_official_gpt2(official)
    x = ids(2, 8)
    for kwargs in ({}, {"labels": x}, {"labels": x, "output_hidden_states": True, "use_cache": False}):
        got = ours(x, return_dict=False, **kwargs)
        want = official(x, return_dict=False, **kwargs)
        assert isinstance(got, tuple) and len(got) == len(want), kwargs
        for a, b in zip(got, want, strict=True):
            assert type(a) is type(b), kwargs
            if isinstance(a, torch.Tensor):  # the loss, the logits (ours have padding columns)
                torch.testing.assert_close(a[..., : b.shape[-1]] if a.dim() else a, b, atol=1e-5, rtol=0)
    backbone = ours.transformer(x, output_hidden_states=True, return_dict=False)
    assert [type(t).__name__ for t in backbone] == ["Tensor", "DynamicCache", "tuple"]
    assert len(backbone[2]) == ours.config.n_layer + 1


def test_output_attentions_from_the_config_and_refused_where_no_weights_exist():
    model = tiny_model(attn_implementation="eager", output_attentions=True, output_hidden_states=True)
    out = model(ids(1, 5))
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="output_attentions=True needs attn_implementation='eager'"):
        model(ids(1, 5))


# ----------------------------------------------------------------------------------------- resizing
@pytest.mark.parametrize(
    ("new_num_tokens", "multiple", "matrix"),
    [
        (50258, None, 50258),  # one added token, no padding
        (50258, 64, 50304),  # one added token, padded for speed
        (50310, 128, 50432),  # past the old padded size
        (50250, None, 50250),  # down
        (50250, 128, 50304),  # down, padded
        (None, 64, 50304),  # only re-pad the real ids
    ],
)
def test_resize_keeps_real_ids_learnable_and_padding_masked(new_num_tokens, multiple, matrix):
    model = tiny_model()  # 50304 rows, 50257 real ids
    real = new_num_tokens or 50257
    kept = model.transformer.wte.weight[: min(real, 50257)].clone()
    model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of=multiple)
    cfg = model.config
    assert (cfg.vocab_size, cfg.tokenizer_vocab_size) == (matrix, real)
    assert model.transformer.wte.weight.shape[0] == matrix
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert torch.equal(model.transformer.wte.weight[: len(kept)], kept)  # real rows untouched
    logits = model(ids(2, 6, high=real)).logits
    assert logits.shape[-1] == matrix
    assert torch.isfinite(logits).all() and (logits[..., real:] == torch.finfo(logits.dtype).min).all()
    if real > 50257:  # the new ids were padding rows: they get fresh rows like any added token
        assert model.transformer.wte.weight[50257:real].abs().sum() > 0
    x = torch.tensor([[1, 2, real - 1, real - 1]])  # the last real id as input and target
    assert torch.isfinite(model(x, labels=x).loss)


def test_fine_tuning_on_an_added_token(hf_tokenizer, tmp_path):
    """add_tokens + resize_token_embeddings(len(tok)) on the padded model: the new token is predicted and learned."""
    import copy

    tok = copy.deepcopy(hf_tokenizer)
    tok.add_tokens(["<|sep|>"])
    new_id = tok.convert_tokens_to_ids("<|sep|>")
    assert new_id == 50257 and len(tok) == 50258
    model = tiny_model().train()
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    assert (model.config.vocab_size, model.config.tokenizer_vocab_size) == (50304, 50258)
    batch = tok(["one <|sep|> two <|sep|> three <|sep|> four"] * 4, return_tensors="pt").input_ids
    assert (batch == new_id).sum() == 12
    targets = batch[:, 1:]
    at_new = targets == new_id  # positions whose next token is the new one

    def new_token_loss():
        logits = model(batch[:, :-1]).logits
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return losses[at_new].mean()

    first = new_token_loss()
    assert torch.isfinite(first)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert new_token_loss().item() < first.item() - 3.0
    # Saved and loaded: the same vocabulary split, the same outputs.
    model.eval().save_pretrained(tmp_path)
    register_auto_classes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.tokenizer_vocab_size == 50258 and loaded.config.vocab_size == 50304
    torch.testing.assert_close(loaded(batch).logits, model(batch).logits)
    assert loaded.to_official_gpt2().config.vocab_size == 50258


# ------------------------------------------------------------------------------------- other attention
@pytest.mark.slow
def test_flex_attention_matches_eager_on_cpu():
    """flex_attention (compiled by PyTorch on first use: slow on CPU, inference only there) = eager, padding too."""
    eager = tiny_model(attn_implementation="eager")
    flex = tiny_model(attn_implementation="flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    x, mask = _left_padded(2, 16, pad=5)
    with torch.no_grad():
        want, got = eager(x, attention_mask=mask).logits, flex(x, attention_mask=mask).logits
    torch.testing.assert_close(got[0, :, :50257], want[0, :, :50257], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, 5:, :50257], want[1, 5:, :50257], atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.slow
def test_flex_attention_trains_and_generates_like_eager_on_cuda():
    eager = tiny_model(attn_implementation="eager").cuda().train()
    flex = tiny_model(attn_implementation="flex_attention").cuda().train()
    x = ids(2, 33).cuda()
    for model in (eager, flex):
        model(x[:, :-1], shift_labels=x[:, 1:]).loss.backward()
    for (name, a), b in zip(eager.named_parameters(), flex.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)
    eager.eval(), flex.eval()
    prompt = ids(1, 6).cuda()
    assert torch.equal(
        flex.generate(prompt, max_new_tokens=12, do_sample=False),
        eager.generate(prompt, max_new_tokens=12, do_sample=False),
    )


def test_flash_attention_2_is_not_offered():
    """Not declared until tested with the flash-attn package: transformers refuses it with a clear message."""
    with pytest.raises(ValueError, match="does not support Flash Attention 2"):
        tiny_model(attn_implementation="flash_attention_2")


def test_bf16_parameters_as_fsdp_mixed_precision_casts_them():
    """FSDP2's mixed precision casts the parameters to bf16 for the forward: the padding logits are bf16's most
    negative value, finite (float32's would round to -inf in bf16)."""
    model = tiny_model()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    logits = model(ids(1, 6)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits[..., 50257:] == torch.finfo(torch.bfloat16).min).all()


# ------------------------------------------------------------------------- packed rows and cheap input checks
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_row_longer_than_the_context_runs_like_separate_sequences(impl):
    """Padding-free training (DataCollatorWithFlattening, TRL's padding_free): sequences concatenated in one row,
    position_ids restarting at 0 for each. The row (70 tokens) is longer than n_positions (64); no position is."""
    from transformers import DataCollatorWithFlattening

    model = tiny_model(attn_implementation=impl)
    lengths = [21, 17, 23, 9]
    seqs = [ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    batch = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])
    assert batch["input_ids"].shape == (1, 70) and batch["position_ids"].max() == 22
    # No cache: transformers derives the per-sequence (block-diagonal) mask from position_ids only then.
    packed = model(**batch, use_cache=False)
    alone = [model(s[None], labels=s[None]) for s in seqs]
    torch.testing.assert_close(packed.logits[0], torch.cat([o.logits[0] for o in alone]), atol=1e-5, rtol=0)
    # The collator masks each sequence's first label: the packed loss is the token-weighted mean of the separate ones.
    weighted = sum(o.loss * (n - 1) for o, n in zip(alone, lengths, strict=True)) / (sum(lengths) - len(lengths))
    torch.testing.assert_close(packed.loss, weighted, atol=1e-6, rtol=0)
    # A position past the table is still refused, by the position it is.
    too_far = batch["position_ids"].clone()
    too_far[0, -1] = 64
    with pytest.raises(ValueError, match="Position 64 is outside the position table"):
        model(batch["input_ids"], position_ids=too_far, use_cache=False)


def test_a_static_cache_past_the_context_is_refused_in_eager_mode():
    """A static cache counts its length in a tensor; on CPU reading it is free, so eager mode still says why."""
    model = tiny_model()
    cache = StaticCache(config=model.config, max_cache_len=72)  # room for more than n_positions (64)
    model(ids(1, 60), cache=cache)
    with pytest.raises(ValueError, match=r"68 tokens \(60 cached \+ 8 new\) is longer than the model's context"):
        model(ids(1, 8), cache=cache)


def test_input_checks_read_no_tensor_data_off_the_cpu():
    """On an accelerator, reading a value waits for every queued kernel (a sync per forward): the checks that read
    tensors run on CPU tensors only (elsewhere the embedding refuses a bad index). Meta tensors have no data at all:
    any read would raise. Python ints (no position_ids, a dynamic cache's length) are checked everywhere."""
    backbone = tiny_model().transformer
    on_meta = ids(1, 8).to("meta")
    backbone._check_input(on_meta, torch.arange(70, 78, device="meta")[None], torch.tensor(70, device="meta"), 8)
    backbone._check_input(on_meta, None, torch.tensor(70, device="meta"), 8)
    with pytest.raises(ValueError, match="longer than the model's context"):
        backbone._check_input(on_meta, None, 60, 8)


def test_forward_compiles_fullgraph_with_a_static_cache():
    """`_can_compile_fullgraph = True` holds: with a static cache the past length is a tensor, and no check may
    branch on it while compiling (Dynamo refuses a data-dependent branch under fullgraph=True). backend="eager":
    the graph capture is what is tested; code generation would cost minutes on 2 CPU cores."""
    model = tiny_model()
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    prompt = ids(2, 8)
    static, dynamic = StaticCache(config=model.config, max_cache_len=16), DynamicCache(config=model.config)
    with torch.no_grad():
        got = compiled(prompt, cache=static).logits[:, -1]  # prefill: past 0 (an int)
        want = model(prompt, cache=dynamic).logits[:, -1]
        for _ in range(3):  # decoding: past is the static cache's 0-d tensor
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            next_id = want.argmax(-1, keepdim=True)  # (B, 1)
            got = compiled(next_id, cache=static).logits[:, -1]
            want = model(next_id, cache=dynamic).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- the old cache name
def test_the_old_cache_argument_name_warns_as_stock_gpt2_and_still_works():
    import warnings

    import transformers
    from packaging.version import Version

    x = ids(1, 5)

    def call_with_old_name(model):
        cache = DynamicCache(config=model.config)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(x, past_key_values=cache)
        assert cache.get_seq_length() == 5  # the cache given under the old name is the one used
        return out, [w for w in caught if "`past_key_values` is deprecated" in str(w.message)]

    ours = tiny_model()
    out, ours_warned = call_with_old_name(ours)
    _, stock_warned = call_with_old_name(tiny_official())
    assert [w.category for w in ours_warned] == [w.category for w in stock_warned]
    if Version(transformers.__version__) < Version("5.40"):  # the name's announced removal: silent from then on
        assert [w.category for w in ours_warned] == [FutureWarning]
    assert torch.equal(out.logits, ours(x, cache=DynamicCache(config=ours.config)).logits)
    _, backbone_warned = call_with_old_name(ours.transformer)
    assert len(backbone_warned) == len(stock_warned)


# ------------------------------------------------------------------------------------- finite padding logits
def test_padding_logits_are_finite_and_change_no_loss_or_sample():
    """The padding ids' logits are the dtype's most negative value, not -inf: two identical models' logits differ by
    0 (not NaN), an entropy computed as -(softmax * log_softmax).sum() (TRL's) is finite, and the loss, the
    probabilities and the samples over the real ids are those of -inf logits, to the bit."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, twin = tiny_model(), tiny_model()
    x = ids(2, 12)
    logits = model(x).logits  # (B, T, V)
    assert (logits - twin(x).logits).abs().max().item() == 0.0
    entropy = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
    assert torch.isfinite(entropy).all()
    as_inf = logits.clone()
    as_inf[..., 50257:] = float("-inf")  # the previous behaviour
    assert torch.equal(F.softmax(logits, -1), F.softmax(as_inf, -1))
    assert torch.equal(F.log_softmax(logits, -1)[..., :50257], F.log_softmax(as_inf, -1)[..., :50257])
    assert torch.equal(model(x, labels=x).loss, model.loss_function(as_inf, x, vocab_size=model.config.vocab_size))

    class PaddingToMinusInf(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(torch.arange(scores.shape[-1]) >= 50257, float("-inf"))

    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=0)
    torch.manual_seed(3)
    sampled = model.generate(x[:1, :4], **kwargs)
    torch.manual_seed(3)
    assert torch.equal(
        sampled, model.generate(x[:1, :4], logits_processor=LogitsProcessorList([PaddingToMinusInf()]), **kwargs)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_padding_logits_are_finite_in_half_precision(dtype):
    """The mask is built in the logits' dtype: float32's min would round to -inf in bf16 and fp16."""
    model = tiny_model().to(dtype)
    logits = model(ids(1, 6)).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert (logits[..., 50257:] == torch.finfo(dtype).min).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 matmul: the mask follows autocast
        logits = tiny_model()(ids(1, 6)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits[..., 50257:] == torch.finfo(torch.bfloat16).min).all()


# ------------------------------------------------------------------------------ remote code is per folder
def test_auto_classes_build_save_and_reload_our_config_once_registered(tmp_path):
    """transformers' causal-LM tester (test_causal_lm_can_accept_training_kwargs), in the project's process:
    AutoModelForCausalLM.from_config with our config, save_pretrained, from_pretrained without trust_remote_code, and
    a forward with Trainer's num_items_in_batch: the loss is the summed cross-entropy over that count."""
    register_auto_classes()
    config = GPT2ReproConfig(**TINY)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert type(model) is GPT2ReproForCausalLM
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map="cpu").eval()
    assert type(loaded) is GPT2ReproForCausalLM and type(AutoModel.from_config(config)) is GPT2ReproModel
    x = ids(3, 8)
    loss, logits = loaded(input_ids=x, labels=x, num_items_in_batch=torch.tensor(5), return_dict=False)[:2]
    summed = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(loss, summed / 5)


def test_a_second_remote_code_folder_needs_trust_and_runs_its_own_code(tmp_path):
    """Importing the model (as the project does, or as one trusted load of a checkpoint does) registers nothing: any
    other folder of model_type gpt2_repro still asks for trust_remote_code, and then runs its own modeling file.
    A fresh process, so that nothing this test session registered (register_auto_classes) is in the way."""
    model = tiny_model()
    folder_a, folder_b = tmp_path / "ckpt_a", tmp_path / "ckpt_b"
    model.save_pretrained(folder_a)
    model.save_pretrained(folder_b)
    with open(folder_b / "modeling_gpt2_repro.py", "a", encoding="utf-8") as f:
        f.write('\n\nGPT2ReproForCausalLM.folder_mark = "B"  # only folder B\'s code sets it\n')
    script = textwrap.dedent(
        f"""
        from transformers import AutoConfig, AutoModelForCausalLM, CONFIG_MAPPING
        import modeling_gpt2_repro  # the project's own module: importing it registers nothing
        assert "gpt2_repro" not in CONFIG_MAPPING
        try:  # not even its config class for the Auto model classes
            AutoModelForCausalLM.from_config(modeling_gpt2_repro.GPT2ReproConfig(n_layer=1, n_head=1, n_embd=8))
            raise SystemExit("AutoModelForCausalLM.from_config knew our config class after importing the model")
        except ValueError as e:
            assert "Unrecognized configuration class" in str(e), e
        a = AutoModelForCausalLM.from_pretrained({str(folder_a)!r}, trust_remote_code=True)
        assert not hasattr(type(a), "folder_mark") and type(a).__module__.startswith("transformers_modules")
        assert "gpt2_repro" not in CONFIG_MAPPING, "a trusted load registered its code for every folder"
        for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
            try:
                load({str(folder_b)!r})
                raise SystemExit(f"{{load.__qualname__}} loaded folder B without trust_remote_code")
            except ValueError as e:
                assert "trust_remote_code" in str(e), e
        b = AutoModelForCausalLM.from_pretrained({str(folder_b)!r}, trust_remote_code=True)
        print("B", type(b).folder_mark, type(b) is not type(a))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "B B True" in proc.stdout
