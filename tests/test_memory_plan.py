"""memory_plan: the parameter and FLOP counts against the model's own, the activation model against the tensors a
real forward saves, the peak against a real step's measured peak and the H200's, the micro-batch search, the
printed plan (fast, no torch), and its refusals."""

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt2_repro.base import cli
from gpt2_repro.base.config import TrainConfig, load_config
from gpt2_repro.base.config import parameter_count as config_parameter_count
from gpt2_repro.base.errors import ConfigError
from gpt2_repro.training.memory_plan import (
    GIB,
    PlanOptions,
    Setup,
    estimate,
    flops_per_token,
    largest_micro_batch,
    micro_batch_candidates,
    normalize_distributed,
    parameter_count,
    parse_memory,
    plan_report,
    usable_bytes,
)
from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM, estimate_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, n_positions=1024, seq_len=1024)


def tiny_setup(**changes) -> Setup:
    base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=50304, n_positions=32, seq_len=32, micro_batch=4)
    return Setup(**{**base, "precision": "fp32", "compiled": False, "fused_optimizer": False, **changes})


@pytest.mark.parametrize(("layers", "width", "vocab"), [(2, 64, 50304), (12, 768, 50257), (48, 1600, 50304)])
def test_parameter_and_flop_counts_are_the_models(layers, width, vocab):
    heads = width // 64
    config = GPT2ReproConfig(n_layer=layers, n_head=heads, n_embd=width, vocab_size=vocab)
    with torch.device("meta"):
        model = GPT2ReproForCausalLM(config)
    assert parameter_count(layers, width, vocab, 1024) == model.num_parameters()
    section = load_config(None, {"n_layer": layers, "n_head": heads, "n_embd": width}).model
    assert parameter_count(layers, width, 50304, 1024) == config_parameter_count(section)
    for seq_len in (128, 1024):
        assert flops_per_token(layers, heads, width, vocab, seq_len) == estimate_flops_per_token(config, seq_len)


def saved_bytes(layers: int, precision: str, vocab: int = 512, batch: int = 2, seq: int = 40, width: int = 64) -> int:
    """Bytes of the distinct tensors a real forward saves for its backward, weights and their autocast copies left
    out (the copies are counted apart). B x T (80) is no dimension of a weight, so no activation passes for one."""
    torch.manual_seed(0)
    config = GPT2ReproConfig(
        n_layer=layers, n_head=4, n_embd=width, n_positions=seq, vocab_size=vocab, tokenizer_vocab_size=vocab
    )
    model = GPT2ReproForCausalLM(config).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {shape for p in model.parameters() if p.dim() == 2 for shape in (tuple(p.shape), tuple(p.shape)[::-1])}
    x, y = torch.randint(0, vocab, (2, batch, seq), generator=torch.Generator().manual_seed(0))
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        copy = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes  # autocast's bf16 copy of a weight (or its .t())
        if storage.data_ptr() not in weights and not copy:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(input_ids=x, shift_labels=y, return_logits=False)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_saved_activations_per_layer_and_head_are_what_the_forward_saves(precision):
    """The model's activation terms, exactly: the difference of a 3-layer and a 1-layer forward is two layers, and
    the 1-layer forward's rest is the head (ln_f, the loss's log-softmax: fp32 in both precisions)."""
    one, three = saved_bytes(1, precision), saved_bytes(3, precision)
    setup = tiny_setup(n_layer=1, n_positions=40, seq_len=40, vocab_size=512, micro_batch=2, precision=precision)
    per_layer = estimate(replace(setup, n_layer=2)).activations - estimate(setup).activations
    assert three - one == 2 * per_layer
    log_softmax = 2 * 40 * 512 * 4  # saved by cross_entropy (eager): the loss's term, not part of `activations`
    assert one - log_softmax - estimate(setup).activations == 4  # the loss's total weight, an fp32 scalar


def measured_peak(setup: Setup, steps: int = 2) -> int:
    """Peak live tensor bytes of the last of `steps` real training steps (forward, backward, clipping, AdamW as
    build_optimizers makes it on CPU), from torch.profiler's allocation events since before the model was built."""
    from torch.profiler import ProfilerActivity, profile

    from gpt2_repro.training.optim import build_optimizers

    cfg = load_config(None, {"n_layer": setup.n_layer, "n_head": setup.n_head, "n_embd": setup.n_embd})
    B, T, V = setup.micro_batch, setup.seq_len, setup.vocab_size
    x, y = torch.randint(0, min(V, 50257), (2, B, T), generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        config = GPT2ReproConfig(
            n_layer=setup.n_layer,
            n_head=setup.n_head,
            n_embd=setup.n_embd,
            n_positions=T,
            vocab_size=V,
            tokenizer_vocab_size=min(V, 50257),
        )
        model = GPT2ReproForCausalLM(config).train()
        if setup.checkpointing:
            model.activation_checkpointing_enable()
        (optimizer,) = build_optimizers(model, cfg, torch.device("cpu"))
        for step in range(steps):
            with torch.profiler.record_function(f"step{step}"):
                model(input_ids=x, shift_labels=y, return_logits=False).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    events = prof.profiler.kineto_results.events()
    start, end = next((e.start_ns(), e.end_ns()) for e in events if e.name() == f"step{steps - 1}")
    live, peak = 0, 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        if start <= t <= end:
            peak = max(peak, live)
    return peak


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(
    "shape",
    [
        dict(micro_batch=4),  # GPT-2's vocabulary: the loss makes the peak
        dict(vocab_size=512, n_embd=128, seq_len=64, n_positions=64, micro_batch=8),  # a small one: the blocks do
    ],
)
def test_peak_of_a_real_step_is_predicted(shape, checkpointing):
    setup = tiny_setup(**shape, checkpointing=checkpointing)
    predicted, measured = estimate(setup).peak, measured_peak(setup)
    assert predicted == pytest.approx(measured, rel=0.01), (predicted, measured)


def test_the_h200_figure_is_predicted():
    """BENCHMARKS.md: 124M, micro-batch 64, bf16 autocast, torch.compile, fused AdamW, one H200: 28.6 GiB."""
    memory = estimate(Setup(**GPT2_124M, micro_batch=64))
    assert memory.peak / GIB == pytest.approx(28.6, rel=0.05)
    assert memory.peak_at == "loss backward"


def test_what_each_setting_changes():
    base = Setup(**GPT2_124M, micro_batch=16, accumulation=4)
    plain = estimate(base)
    assert estimate(replace(base, checkpointing=True)).activations < plain.activations / 5
    assert estimate(replace(base, compiled=False)).loss_peak == 6 * plain.loss_peak  # 12 V fp32 bytes vs 2 V bf16
    muon = estimate(replace(base, optimizer="muon"))
    assert plain.optimizer_state - muon.optimizer_state == 4 * 12 * 12 * 768**2  # one buffer, not two, per matrix
    ddp = estimate(replace(base, distributed="ddp", gpus=8))
    assert ddp.ddp_buckets == plain.weights and ddp.peak == plain.peak + ddp.ddp_buckets
    assert estimate(replace(base, distributed="ddp", gpus=1)).ddp_buckets == 0  # one process: no DDP wrapper
    fsdp = estimate(replace(base, distributed="fsdp", gpus=8))
    assert fsdp.weights == plain.weights // 8 and fsdp.optimizer_state == plain.optimizer_state // 8
    assert fsdp.weight_copies == 0 and fsdp.peak < plain.peak
    # gathered in bf16: the root (embeddings, ln_f) and two blocks, and as much again for their unsharded gradients
    block, root = 12 * 768**2 + 13 * 768, 50304 * 768 + 1024 * 768 + 2 * 768
    assert fsdp.fsdp_gathered == 2 * 2 * (root + 2 * block)
    assert estimate(replace(base, accumulation=1)).peak < plain.peak  # no gradients alive through the forward
    assert estimate(replace(base, fused_optimizer=False)).moments["optimizer step"] > plain.moments["optimizer step"]


def test_largest_micro_batch_divides_the_batch_and_fits():
    setup = Setup(**GPT2_124M, micro_batch=1)
    assert micro_batch_candidates(524288, 1024, 8) == [1, 2, 4, 8, 16, 32, 64]
    micro_batch, accumulation, memory = largest_micro_batch(setup, 524288, usable_bytes(40 * GIB))
    assert micro_batch * accumulation * 1024 == 524288 and memory.peak <= usable_bytes(40 * GIB)
    twice = estimate(replace(setup, micro_batch=2 * micro_batch, accumulation=accumulation // 2))
    assert twice.peak > usable_bytes(40 * GIB)
    assert largest_micro_batch(setup, 524288, 1 * GIB) is None
    with pytest.raises(ConfigError, match="multiple of 3072"):
        micro_batch_candidates(524288, 1024, 3)


def test_parse_memory_and_distributed_type():
    assert parse_memory("80GB") == parse_memory("80 GiB") == parse_memory("80") == 80 * GIB
    assert parse_memory("512MiB") == 2**29 and parse_memory("1.5t") == int(1.5 * 2**40)
    for bad in ("lots", "-8GB", "0", "80 PB"):
        with pytest.raises(ConfigError, match="--gpu_memory"):
            parse_memory(bad)
    assert normalize_distributed(None, 8) == "ddp" and normalize_distributed(None, 1) == "none"
    assert normalize_distributed("MULTI_GPU", 8) == "ddp" and normalize_distributed("FSDP", 8) == "fsdp"
    with pytest.raises(ConfigError, match="--distributed_type 'deepspeed'"):
        normalize_distributed("deepspeed", 8)


def test_plan_report_of_a_preset():
    cfg = cli.build(TrainConfig, ROOT / "configs" / "gpt2_1558m.yaml", {})
    text = plan_report(cfg, parse_memory("80GB"), gpus=8, distributed_type="ddp")
    assert "parameters 1,557,686,400 (1,557,611,200 with GPT-2's 50,257-row head: padding adds 75,200)" in text
    lines = text.splitlines()
    row = next(line for line in lines if line.strip().startswith("compiled, no checkpointing") and "(x" in line)
    assert row.split()[-4:] == ["8", "(x16)", "16", "(x8)"]  # DDP, FSDP
    assert "FLOPs per token 10.28 G" in text and "step time at 40% MFU of 8 x 989 TFLOP/s" in text
    muon = plan_report(replace(cfg, optim=replace(cfg.optim, optimizer="muon")), 80 * GIB, 8, "fsdp")
    header = next(line for line in muon.splitlines() if line.strip().startswith("bytes per GPU"))
    assert header.split()[-2:] == ["FSDP", "DDP"] and "Muon + AdamW (fused)" in muon  # Muon runs under FSDP2 too
    with pytest.raises(ConfigError, match="--gpus 0"):
        plan_report(cfg, 80 * GIB, gpus=0)
    with pytest.raises(ConfigError, match="multiple of 3072"):
        plan_report(cfg, 80 * GIB, gpus=3)


def test_plan_options_are_train_options_outside_its_config():
    """--plan and its settings follow the command-line convention (--a_b or --a-b, a bare --plan is true, typed
    values), are listed in train.py --help, stay out of the run's config, and are refused without --plan."""
    from gpt2_repro.base.config import parse_command_line

    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--plan", "--gpu-memory", "141GB", "--gpus", "8"]
    cfg, options = parse_command_line([*argv, "--max_steps", "20", "--mfu", "0.5"], PlanOptions)
    assert (options.plan, options.gpu_memory, options.gpus, options.mfu) == (True, "141GB", 8, 0.5)
    assert (options.distributed_type, options.gpu) == (None, "H100") and cfg.optim.max_steps == 20
    assert "plan" not in cli.flat_options(cfg.to_dict()) and "gpus" not in cli.to_yaml(cfg)
    assert parse_command_line(["--plan", "false"], PlanOptions)[1] == PlanOptions()
    with pytest.raises(ConfigError, match="--gpus: expected int, got 'eight'"):
        parse_command_line(["--plan", "--gpus", "eight"], PlanOptions)
    with pytest.raises(ConfigError, match="--gpus, --distributed_type: options of --plan .*--num_processes"):
        parse_command_line(["--gpus", "8", "--distributed_type", "fsdp"], PlanOptions)
    with pytest.raises(ConfigError, match="--gpu_memory 'lots'"):
        parse_command_line(["--plan", "--gpu_memory", "lots"], PlanOptions)
    with pytest.raises(ConfigError, match="--mfu 1.5"):
        parse_command_line(["--plan", "--mfu", "1.5"], PlanOptions)
    text = cli.build_parser(TrainConfig, extra=PlanOptions).format_help()
    assert "--plan: the memory plan of the config instead of a run" in text
    for flag in ("--plan [BOOL]", "--gpu_memory STR, --gpu-memory STR", "--gpus INT", "--distributed-type STR"):
        assert flag in text, flag


def test_train_plan_answers_at_once_without_torch_and_writes_nothing(tmp_path):
    """`python train.py --config configs/gpt2_124m.yaml --plan --gpu_memory 80GB --gpus 8`, as a user runs it, from
    an empty folder: exit 0 in under 2 s, torch and transformers never imported, the folder still empty (no run
    folder, no lock), and the largest micro-batch that fits 8 x 80 GB is the preset's 64."""
    config = ROOT / "configs" / "gpt2_124m.yaml"
    args = ["--config", str(config), "--plan", "--gpu_memory", "80GB", "--gpus", "8"]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "transformers", "accelerate", "datasets", "numpy"} & imported
    assert seconds < 2.0, seconds
    assert list(tmp_path.iterdir()) == []
    rows = proc.stdout.splitlines()
    assert rows[0].startswith("Memory plan (no GPU touched): GPT-2 12 layers x 768 wide")
    assert "8 x 80 GiB GPUs, DDP, bf16 autocast, AdamW (fused)" in proc.stdout
    table = rows.index(next(r for r in rows if r.strip().startswith("largest micro-batch that fits")))
    fits = {r.split("  ")[1].strip(): r.split()[-4:] for r in rows[table + 1 : table + 5]}
    assert fits["compiled, no checkpointing"] == ["64", "(x1)", "64", "(x1)"]  # DDP, FSDP
