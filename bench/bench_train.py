"""Framework overhead of train.py's step against a bare PyTorch loop (one process, CPU or one GPU).

    python bench/bench_train.py                       # the tiny preset's model and batch
    python bench/bench_train.py --rounds 8 --steps 4
    python bench/bench_train.py --n_layer 2 --n_embd 64 --seq_len 32 --micro_batch_size 4 --total_batch_tokens 256
                                                      # any train.py option: a smaller step shows overhead more

Both variants train their own copy of the same model (same initial weights) on the same token stream with the same
batch and accumulation: variant "train.py" is `train_step` on accelerate-prepared model and optimizer (with
its divergence guard and stop flag), plus the guard's bookkeeping and the per-step metrics line train.py writes;
variant "bare" is the loop everyone writes by hand (loss / accum, backward, clip, AdamW step, one .item()). They
alternate in rounds (interleaved, so load changes on a shared machine hit both), and the per-round tokens/s ratios
are summarised by their median. Their losses must agree: the comparison is only fair if both do the same work.
On a GPU both run what train.py runs there (its mixed precision as autocast, torch.compile when it compiles,
fused AdamW); the data and the timers include the host-to-device copies and the step's synchronisation.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_repro.base.config import parse_args
from gpt2_repro.base.run_folder import RunFolder
from gpt2_repro.data.shard_loader import TokenShardLoader
from gpt2_repro.data.shards import write_shard
from gpt2_repro.training.accelerator import make_accelerator
from gpt2_repro.training.optim import build_optimizers, lr_at, set_lrs
from gpt2_repro.training.step import train_step
from gpt2_repro.training.stopping import DivergenceGuard, StopRequest
from modeling_gpt2_repro import GPT2ReproForCausalLM


def bare_step(model, optimizer, loader, lr: float, accum: int, grad_clip: float, device, bf16: bool) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_accum = torch.zeros((), device=device)
    for _ in range(accum):
        x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, shift_labels=y, return_logits=False).loss / accum
        loss_accum += loss.detach()
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_accum.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--rounds", type=int, default=30, help="alternations of the two variants")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    args, train_options = parser.parse_known_args()

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cfg = parse_args(["--config", args.config, *train_options, "--output_dir", str(work / "run"), "--log_with", "none"])
    data, optim = cfg.data, cfg.optim
    tokens = np.random.default_rng(0).integers(0, 50257, 2_000_000, dtype=np.uint16)  # ids only; speed only
    write_shard(work / "bench_train_000001.bin", tokens)
    make_loader = lambda: TokenShardLoader(work, batch_size=data.micro_batch_size, seq_len=data.seq_len, seed=0)

    accelerator = make_accelerator(cfg, RunFolder(work / "run"))  # sets threads as train.py does
    if args.threads:
        torch.set_num_threads(args.threads)
    accum = accelerator.gradient_accumulation_steps
    torch.manual_seed(0)
    model_a = GPT2ReproForCausalLM(cfg.model_config())
    model_b = GPT2ReproForCausalLM(cfg.model_config())
    model_b.load_state_dict(model_a.state_dict())
    opt_a = build_optimizers(model_a, cfg, accelerator.device)
    (opt_b,) = build_optimizers(model_b, cfg, accelerator.device)  # the bare loop: AdamW only
    model_a, *opt_a = accelerator.prepare(model_a, *opt_a)
    model_b.to(accelerator.device)
    bf16 = accelerator.mixed_precision == "bf16"
    if str(accelerator.state.dynamo_plugin.backend.value) != "NO":
        model_b = torch.compile(model_b)  # what prepare() did to model_a
    loader_a, loader_b = make_loader(), make_loader()
    folder = RunFolder(work)
    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, device {accelerator.device}, "
        f"precision {accelerator.mixed_precision}, compile {accelerator.state.dynamo_plugin.backend.value}"
    )
    print(f"# model {cfg.model}, batch {data.micro_batch_size} x {data.seq_len} x {accum} accumulation")

    guard, stop = DivergenceGuard(optim.max_bad_steps), StopRequest()

    def run_train_py(step: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        set_lrs(opt_a, step, optim)
        result = train_step(accelerator, model_a, opt_a, loader_a, optim.grad_clip, stop)
        guard.update(step + 1, result.bad, result.loss)
        row = {"step": step + 1, "loss": result.loss, "grad_norm": result.grad_norm}
        folder.append_metrics(row)
        return result.loss, time.perf_counter() - t0

    def run_bare(step: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        lr, clip = lr_at(step, optim), optim.grad_clip or math.inf
        loss = bare_step(model_b, opt_b, loader_b, lr, accum, clip, accelerator.device, bf16)
        return loss, time.perf_counter() - t0

    variants = {"train.py": run_train_py, "bare": run_bare}
    losses = {name: [] for name in variants}
    times = {name: [] for name in variants}
    for fn in variants.values():  # warm-up (allocator, first-call costs), not timed
        fn(0)
    step = {name: 1 for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate who goes first
        for name in order:
            elapsed = 0.0
            for _ in range(args.steps):
                loss, dt = variants[name](step[name])
                losses[name].append(loss)
                elapsed += dt
                step[name] += 1
            times[name].append(args.steps * data.total_batch_tokens / elapsed)
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:,.0f} tok/s" for n in variants), flush=True)

    ratios = [a / b for a, b in zip(times["train.py"], times["bare"], strict=True)]
    drift = max(abs(a - b) for a, b in zip(losses["train.py"], losses["bare"], strict=True))
    medians = {name: statistics.median(t) for name, t in times.items()}
    best = {name: max(t) for name, t in times.items()}  # the least disturbed round of each (shared machines)
    print(
        f"tokens/s median: train.py {medians['train.py']:,.0f}, bare {medians['bare']:,.0f}; "
        f"best: train.py {best['train.py']:,.0f}, bare {best['bare']:,.0f}"
    )
    print(
        f"train.py / bare: median of per-round ratios {statistics.median(ratios):.3f}, "
        f"of best rounds {best['train.py'] / best['bare']:.3f}"
    )
    overhead = 1.0 - statistics.median(ratios)
    print(f"overhead of train.py's step: {overhead:+.1%} (target < 5%); max |loss difference| {drift:.2e}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
