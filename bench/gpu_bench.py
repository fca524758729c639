"""Training throughput of train.py's step on one GPU: GPT-2 124M, bf16, torch.compile, T=1024.

    python bench/gpu_bench.py                          # 124M, micro-batch 16, 50 timed steps after warm-up
    python bench/gpu_bench.py --micro_batch_size 64    # the recipe's micro-batch (80 GB cards)
    python bench/gpu_bench.py --tiny                   # a tiny model on CPU: checks the script, not the speed

It runs the real thing: configs/gpt2_124m.yaml through train.py's make_accelerator / build_model /
build_optimizer / train_step, fed by TokenShardLoader from a synthetic shard (random ids: speed does not depend
on the text). One optimizer step = one micro-batch (no accumulation), so tokens/s is per forward+backward.
Prints tokens/s, MFU (model FLOPs per token x tokens/s over the GPU's dense bf16 peak) and peak memory.
Targets on one H100: >= 450K tokens/s and >= 40% MFU (llm.c reaches about 468K tokens/s per H100).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_repro.base.config import load_config
from gpt2_repro.base.machine import peak_bf16_flops
from gpt2_repro.base.run_folder import RunFolder
from gpt2_repro.data.shard_loader import TokenShardLoader
from gpt2_repro.data.shards import write_shard
from gpt2_repro.training.accelerator import make_accelerator
from gpt2_repro.training.optim import build_optimizers, set_lrs
from gpt2_repro.training.step import train_step
from gpt2_repro.training.tracking import mfu
from modeling_gpt2_repro import GPT2ReproForCausalLM, estimate_flops_per_token

TINY = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64, "seq_len": 64}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto", help="auto: on CUDA")
    parser.add_argument("--tiny", action="store_true", help="tiny model, micro-batch 4: a CPU smoke test")
    parser.add_argument("--profile", type=Path, default=None, help="write torch.profiler's table of one step here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    overrides = {"output_dir": str(work / "run"), "log_with": "none", "compile": args.compile}
    micro_batch, seq_len = (4, TINY["seq_len"]) if args.tiny else (args.micro_batch_size, 1024)
    overrides |= {"micro_batch_size": micro_batch, "total_batch_tokens": micro_batch * seq_len}  # no accumulation
    cfg = load_config(ROOT / "configs" / "gpt2_124m.yaml", overrides | (TINY if args.tiny else {}))
    data, optim = cfg.data, cfg.optim

    accelerator = make_accelerator(cfg, RunFolder(work / "run"))
    if accelerator.num_processes != 1:
        raise SystemExit("gpu_bench.py measures one device: run it with python, not a multi-process launcher.")
    steps_total = args.warmup + args.steps
    tokens = np.random.default_rng(0).integers(0, 50257, (steps_total + 1) * data.micro_batch_size * data.seq_len + 1)
    write_shard(work / "bench_train_000001.bin", tokens.astype(np.uint16))
    loader = TokenShardLoader(work, batch_size=data.micro_batch_size, seq_len=data.seq_len, seed=0)

    torch.manual_seed(0)
    raw_model = GPT2ReproForCausalLM(cfg.model_config())
    model, *optimizers = accelerator.prepare(raw_model, *build_optimizers(raw_model, cfg, accelerator.device))
    model.train()
    cuda = accelerator.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"# {name}, torch {torch.__version__}, {accelerator.mixed_precision}, "
        f"compile {accelerator.state.dynamo_plugin.backend.value}, B={data.micro_batch_size} T={data.seq_len}"
    )

    def step_at(step: int) -> float:
        set_lrs(optimizers, step, optim)
        return train_step(accelerator, model, optimizers, loader, optim.grad_clip).loss

    t0 = time.perf_counter()
    loss = step_at(0)  # the first step compiles (forward and backward graphs)
    sync()
    compile_s = time.perf_counter() - t0
    for step in range(1, args.warmup):
        loss = step_at(step)
    sync()
    warmup_s = time.perf_counter() - t0
    print(f"first step (compilation included): {compile_s:.1f}s")
    print(f"warm-up: {args.warmup} steps in {warmup_s:.1f}s, loss {loss:.3f}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(args.warmup, steps_total):
        loss = step_at(step)
    sync()
    elapsed = time.perf_counter() - t0
    if args.profile:
        write_profile(args.profile, lambda: step_at(steps_total), cuda)

    tokens_per_sec = args.steps * data.micro_batch_size * data.seq_len / elapsed
    flops_per_token = estimate_flops_per_token(raw_model.config, data.seq_len)
    peak = peak_bf16_flops(name) if cuda else None
    result = {
        "device": name,
        "tokens_per_sec": tokens_per_sec,
        "step_ms": elapsed / args.steps * 1000,
        "mfu": mfu(flops_per_token, tokens_per_sec, peak, 1),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "first_step_s": compile_s,
        "loss": loss,
    }
    print(f"tokens/s: {tokens_per_sec:,.0f}  (target on one H100: >= 450,000)")
    print(f"step time: {result['step_ms']:.1f} ms for {data.micro_batch_size * data.seq_len:,} tokens")
    print(
        f"MFU: {result['mfu']:.1%}  ({flops_per_token / 1e6:.0f}M FLOPs/token, peak "
        f"{(peak or float('nan')) / 1e12:.0f} TFLOP/s bf16; target >= 40%)"
    )
    print(f"peak memory: {result['peak_memory_gib']:.1f} GiB")
    shutil.rmtree(work, ignore_errors=True)
    return result


def write_profile(path: Path, step, cuda: bool) -> None:
    """One optimizer step under torch.profiler: the operators and kernels that take the time, as a table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60))
    print(f"profile of one step: {path}")


if __name__ == "__main__":
    main()
