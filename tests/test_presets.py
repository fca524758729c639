"""The presets of the larger GPT-2s (configs/gpt2_350m.yaml, gpt2_774m.yaml, gpt2_1558m.yaml): the official model
sizes, llm.c's recipes, batch arithmetic that divides, a micro-batch that the memory plan fits on an 80 GB GPU, and
OpenAI's checkpoints loading into them. Every model is built on the meta device: shapes only, no memory."""

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_repro.base.config import grad_accum_steps, load_config
from gpt2_repro.training.memory_plan import largest_micro_batch, setup_from_config, usable_bytes
from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM, transpose_conv1d_weights

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_VOCAB = 50257

# preset: (n_layer, n_head, n_embd), OpenAI's parameter count (tied 50,257-row head), the llm.c script's recipe
# (max_lr, min_lr = final fraction x max_lr, warmup, steps, tokens per step) and micro-batch (-b, per GPU of 8)
PRESETS = {
    "gpt2_350m.yaml": ((24, 16, 1024), 354_823_168, (3e-4, 0.0, 700, 60_000, 524_288), 64),
    "gpt2_774m.yaml": ((36, 20, 1280), 774_030_080, (2.5e-4, 0.0, 700, 286_102, 524_288), 32),
    "gpt2_1558m.yaml": ((48, 25, 1600), 1_557_611_200, (6e-4, 6e-5, 700, 32_000, 1_048_576), 16),
}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def preset(request):
    name = request.param
    return name, load_config(ROOT / "configs" / name), *PRESETS[name]


def test_the_model_is_the_official_size(preset):
    _, cfg, (layers, heads, width), official, _, _ = preset
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.n_positions, m.vocab_size, m.dropout) == (
        layers,
        heads,
        width,
        1024,
        50304,
        0.0,
    )
    with torch.device("meta"):
        ours = GPT2ReproForCausalLM(cfg.model_config())
        unpadded = GPT2ReproForCausalLM(GPT2ReproConfig(n_layer=layers, n_head=heads, n_embd=width, vocab_size=50257))
        stock = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=heads, n_embd=width))
    assert stock.num_parameters() == official  # the sizes are those of OpenAI's checkpoints
    assert unpadded.num_parameters() == official
    # padding the tied embedding from 50,257 to 50,304 rows adds 47 rows of n_embd, once (the LM head is that tensor)
    assert ours.num_parameters() == official + (50304 - OFFICIAL_VOCAB) * width
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_official_weights_map_onto_the_preset_one_to_one(preset):
    """OpenAI's checkpoint of this size converts into the preset's model through the project's interop, every
    parameter found and none left over (from_official_gpt2 refuses otherwise), and converts back the same way."""
    _, cfg, (layers, heads, width), *_ = preset
    with torch.device("meta"):
        stock = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=heads, n_embd=width))
        ours = GPT2ReproForCausalLM.from_official_gpt2(stock, vocab_size=cfg.model.vocab_size)
        back = ours.to_official_gpt2()
    assert ours.config.to_diff_dict() | {"tokenizer_vocab_size": None} == cfg.model_config().to_diff_dict() | {
        "tokenizer_vocab_size": None
    }
    official_shapes = {k: tuple(v.shape) for k, v in transpose_conv1d_weights(stock.state_dict()).items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert official_shapes.keys() == our_shapes.keys()
    padded = {"transformer.wte.weight", "lm_head.weight"}
    assert {k: v for k, v in official_shapes.items() if k not in padded} == {
        k: v for k, v in our_shapes.items() if k not in padded
    }
    for key in padded:
        assert official_shapes[key] == (OFFICIAL_VOCAB, width) and our_shapes[key] == (50304, width)
    assert {k: tuple(v.shape) for k, v in back.state_dict().items()} == {
        k: tuple(v.shape) for k, v in stock.state_dict().items()
    }


def test_llm_c_recipe_and_batch_arithmetic(preset):
    name, cfg, _, _, (max_lr, min_lr, warmup, steps, tokens), llm_c_micro_batch = preset
    o, d = cfg.optim, cfg.data
    assert (o.max_lr, o.min_lr, o.warmup_steps, o.max_steps, d.total_batch_tokens) == (
        max_lr,
        min_lr,
        warmup,
        steps,
        tokens,
    )
    assert (o.optimizer, o.schedule, o.weight_decay, o.beta1, o.beta2, o.eps, o.grad_clip) == (
        "adamw",
        "cosine",
        0.1,
        0.9,
        0.95,
        1e-8,
        1.0,
    )
    assert d.seq_len == 1024 and d.micro_batch_size <= llm_c_micro_batch
    # the header's arithmetic: 8 GPUs and 1 GPU both divide
    header = (ROOT / "configs" / name).read_text()
    for gpus in (8, 1):
        accumulation = grad_accum_steps(tokens, d.micro_batch_size, d.seq_len, gpus)
        assert (
            f"{gpus} GPU{'s' if gpus > 1 else ' '} -> {d.micro_batch_size} x 1024 x {gpus} x {accumulation}" in header
        )


def test_the_micro_batch_fits_an_80gb_gpu_and_the_header_says_what_fits(preset):
    """The preset's micro-batch fits 8 x 80 GB under DDP by the memory plan (bf16, compiled, fused AdamW), and the
    header states the plan's largest micro-batch without and with activation checkpointing."""
    name, cfg, *_ = preset
    header = (ROOT / "configs" / name).read_text()
    usable = usable_bytes(80 * 2**30)
    for checkpointing in (False, True):
        setup = setup_from_config(cfg, 8, "ddp", checkpointing=checkpointing)
        micro_batch, accumulation, memory = largest_micro_batch(setup, cfg.data.total_batch_tokens, usable)
        if not checkpointing:
            assert micro_batch == cfg.data.micro_batch_size
        state = "with" if checkpointing else "without"
        assert f"{state} activation checkpointing: micro-batch {micro_batch} " in header, (name, micro_batch)
