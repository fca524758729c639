"""The Muon optimizer step's time per process with 2 processes: today's (torch.optim.Muon: every process
orthogonalizes every matrix) against the sharded one (gpt2_repro/training/muon.py: each process orthogonalizes its
share, the results broadcast), on GPT-2 models of two sizes, over gloo on CPU with one thread per process.

    python bench/bench_muon.py [--sizes 4x256 6x384] [--repeats 7]

It starts itself under torchrun (2 processes). Each process builds the model (same seed: the same weights), gives the
blocks' matrices the same random gradients (what DDP's all-reduce leaves in every process), and times
`optimizer.step()` of each variant in turn, `--repeats` times, interleaved, after a warm-up step, with a barrier
before each; the step's wall-clock per process, median over repeats, slowest process. `bound`: the ratio if only
the orthogonalization counted (total Newton-Schulz work / the busiest process's share). The CPU's fp32 Newton-Schulz
(optim.orthogonalize_in_fp32_on_cpu) in both, as train.py runs on CPU. The AdamW group's step is the same in both
and not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from gpt2_repro.training.muon import DistributedMuon, assign_owners, newton_schulz_cost
    from gpt2_repro.training.optim import muon_param_names, orthogonalize_in_fp32_on_cpu
    from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    orthogonalize_in_fp32_on_cpu()
    rows = []
    for size in args.sizes:
        layers, width = (int(v) for v in size.split("x"))
        torch.manual_seed(0)
        model = GPT2ReproForCausalLM(GPT2ReproConfig(n_layer=layers, n_head=width // 64, n_embd=width, n_positions=64))
        names = muon_param_names(model)
        matrices = [p for n, p in model.named_parameters() if n in names]
        hyper = {"lr": 0.02, "weight_decay": 0.0, "momentum": 0.95, "adjust_lr_fn": "match_rms_adamw"}
        variants = {"today": torch.optim.Muon(matrices, **hyper), "sharded": DistributedMuon(matrices, **hyper)}
        generator = torch.Generator().manual_seed(1)
        for p in matrices:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        times = {name: [] for name in variants}
        for repeat in range(args.repeats + 1):  # the first: warm-up (momentum buffers, first calls)
            for name, optimizer in variants.items():
                dist.barrier()
                start = time.perf_counter()
                optimizer.step()
                elapsed = time.perf_counter() - start
                if repeat:
                    times[name].append(elapsed)
        medians = [statistics.median(times[name]) for name in variants]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, medians)
        today, sharded = (max(m[i] for m in everyone) for i in range(2))
        shapes = sorted({tuple(p.shape) for p in matrices})
        costs = [newton_schulz_cost(p.shape) for p in matrices]  # the busiest process's share of the work
        owners = assign_owners(costs, dist.get_world_size())
        busiest = max(sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in set(owners)) / sum(costs)
        rows.append((size, len(matrices), shapes, today, sharded, 1 / busiest))
    if rank == 0:
        print(
            f"{'model':>7} {'matrices':>8}  {'today ms':>9} {'sharded ms':>10} {'today/sharded':>13} {'bound':>5}  "
            "shapes"
        )
        for size, count, shapes, today, sharded, bound in rows:
            print(
                f"{size:>7} {count:>8}  {today * 1e3:9.1f} {sharded * 1e3:10.1f} {today / sharded:13.2f} {bound:5.2f}  "
                f"{shapes}"
            )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["4x256", "6x384"], help="LAYERSxWIDTH (width: 64 per head)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, __file__, "--worker", "--repeats", str(args.repeats), "--sizes", *args.sizes]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
