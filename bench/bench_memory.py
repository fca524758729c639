"""Peak memory of a training step, measured, against the memory plan's prediction (gpt2_repro/training/memory_plan.py).

    python bench/bench_memory.py                       # the CPU grid: eager fp32, two model sizes, two sequence
                                                       # lengths, micro-batches 1-16, activation checkpointing off/on
    python bench/bench_memory.py --grid compiled       # torch.compile + bf16 autocast (each case compiles: minutes)
    python bench/bench_memory.py --grid rss            # the allocator's figure against the process's peak RSS
    python bench/bench_memory.py --grid gpu            # a CUDA GPU: torch.cuda.max_memory_allocated, 124M and 350M
    python bench/bench_memory.py --case '{"n_layer": 2, "n_embd": 128, "seq_len": 64, "micro_batch": 4}'
    python bench/bench_memory.py --grid eager --out eager.json; python bench/bench_memory.py --recorded eager.json

Each case is a fresh Python process that builds GPT2ReproForCausalLM, its optimizer (the project's build_optimizers:
AdamW in PyTorch's default implementation on CPU, a loop over the parameters, or fused as on CUDA) and random
batches, runs one optimizer step (forward, backward, gradient clipping, step, zero_grad(set_to_none)) to allocate the
optimizer's state, then a second one, whose peak is reported: the steady state, as `torch.cuda.max_memory_allocated`
after a warm-up reports it on a GPU.

What is measured: the bytes of live tensors, from the allocation events of torch.profiler (profile_memory=True),
summed in time order from before the model is built. That is the quantity the plan predicts and the one
`max_memory_allocated` gives on CUDA (tensor bytes, not the allocator's cached blocks), which a CPU has no counter
for. `--grid rss` checks it against what the operating system sees: the peak resident set (VmHWM, reset through
/proc/self/clear_refs before the measured step) less what the process held before the model (libraries, the
interpreter), with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the system
at once rather than staying in malloc's heap.

The same child also reports the step's two losses: a case with activation checkpointing must give the losses of the
case without it (same seed, same batches) to 1e-6; the grid prints the largest difference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_repro.training.memory_plan import Memory, Setup, estimate

DEFAULT_CASE = {
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 128,
    "vocab_size": 50304,
    "seq_len": 64,
    "micro_batch": 4,
    "checkpointing": False,
    "precision": "fp32",  # fp32 | bf16 (autocast, the GPU recipe's)
    "compile": False,
    "optimizer": "adamw",  # adamw | muon (the project's build_optimizers)
    "fused": False,  # AdamW's fused kernel (the project's choice on CUDA) instead of PyTorch's CPU default (a loop)
    "method": "alloc",  # alloc: live tensor bytes (torch.profiler); rss: the peak resident set; cuda: see below
    "steps": 2,
}


# ------------------------------------------------------------------------------------------------- the child
def run_case(case: dict) -> dict:
    """One case, in this process: build, step, measure. Returns the measured figures and the losses."""
    import torch

    c = {**DEFAULT_CASE, **case}
    cuda = c["method"] == "cuda"  # torch.cuda.max_memory_allocated on a GPU (TF32 and all, as train.py runs there)
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # the allocator figure does not depend on threads; the machine is shared
    from gpt2_repro.base.config import load_config
    from gpt2_repro.training.optim import build_optimizers
    from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM

    B, T, V = c["micro_batch"], c["seq_len"], c["vocab_size"]
    model_fields = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], n_positions=T, vocab_size=V)
    # the optimizer's settings (build_optimizers reads only those; a small test vocabulary would fail the preset's
    # model checks, which expect GPT-2's tokenizer)
    cfg = load_config(None, {**model_fields, "vocab_size": 50304, "seq_len": T, "optimizer": c["optimizer"]})
    real_ids = min(V, 50257)  # a small vocabulary (to isolate the blocks' activations) is all real ids
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randint(0, real_ids, (B, T), generator=gen).to(device),
            torch.randint(0, real_ids, (B, T), generator=gen).to(device),
        )
        for _ in range(c["steps"])
    ]
    mixed = c["precision"] == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
    if cuda:
        torch.set_float32_matmul_precision("high")
    rss = c["method"] == "rss"
    rss_before = _status_kib("VmRSS") * 1024 if rss else 0

    profiler = None
    if not rss and not cuda:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        profiler.__enter__()
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(GPT2ReproConfig(**model_fields, tokenizer_vocab_size=real_ids)).to(device).train()
    if c["checkpointing"]:
        model.activation_checkpointing_enable()  # transformers' own: each GPT2ReproBlock re-runs in the backward
    optimizers = build_optimizers(model, cfg, device)  # fused on CUDA
    if c["fused"] and not cuda:
        adamw = optimizers[0]
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adamw.param_groups]
        optimizers[0] = torch.optim.AdamW(groups, lr=adamw.defaults["lr"], betas=adamw.defaults["betas"], fused=True)
    forward = torch.compile(model) if c["compile"] else model
    params = [p for p in model.parameters()]

    def step(x, y) -> float:
        with torch.profiler.record_function("forward"), autocast:
            loss = forward(input_ids=x, shift_labels=y, return_logits=False).loss
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = []
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        if i == len(batches) - 1:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if rss:
                rss_held = _status_kib("VmRSS") * 1024  # the model, the optimizer state, the libraries
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            with torch.profiler.record_function("measured_step"):
                losses.append(step(x, y))
        else:
            losses.append(step(x, y))
    seconds = time.perf_counter() - t0
    out = {"case": c, "losses": losses, "seconds": round(seconds, 2)}
    state_bytes = sum(p.numel() * p.element_size() for p in params) + sum(
        t.numel() * t.element_size()
        for opt in optimizers
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    out["held_bytes"] = state_bytes  # weights + optimizer state, alive between steps
    if cuda:
        out.update(peak_bytes=torch.cuda.max_memory_allocated(), device=torch.cuda.get_device_name())
    elif rss:
        hwm = _status_kib("VmHWM") * 1024
        # what the process held besides the weights and optimizer state (libraries, interpreter, caches)
        overhead = rss_held - state_bytes
        out.update(peak_bytes=hwm - overhead, rss_before_model=rss_before, rss_held=rss_held, rss_peak=hwm)
    else:
        profiler.__exit__(None, None, None)
        out.update(_peaks_from_profile(profiler))
    return out


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peaks_from_profile(profiler) -> dict:
    """Live tensor bytes over time from the profiler's allocation events: the peak of the measured (last) step, and
    of each of its phases."""
    events = profiler.profiler.kineto_results.events()
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    ranges = {
        e.name(): (e.start_ns(), e.end_ns())
        for e in events
        if e.name() in ("measured_step", "forward", "backward", "optimizer")
    }
    # record_function ranges of the same name repeat each step: keep those inside the measured step
    measured = next((e.start_ns(), e.end_ns()) for e in events if e.name() == "measured_step")
    phases = {
        e.name(): (e.start_ns(), e.end_ns())
        for e in events
        if e.name() in ("forward", "backward", "optimizer") and measured[0] <= e.start_ns() <= measured[1]
    }
    ranges.update(phases)
    live, peak, start_live = 0, {name: 0 for name in ("measured_step", *phases)}, None
    for t, nbytes in memory:
        if start_live is None and t >= measured[0]:
            start_live = live
        live += nbytes
        for name, (a, b) in (("measured_step", measured), *phases.items()):
            if a <= t <= b:
                peak[name] = max(peak[name], live)
    return {"peak_bytes": peak.pop("measured_step"), "start_bytes": start_live, "phase_peaks": peak}


def run_child(case: dict) -> dict:
    """run_case in a fresh process (nothing allocated by an earlier case can linger)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- the grids
def grid(name: str) -> list[dict]:
    """The cases of a grid (each a dict of DEFAULT_CASE's keys)."""
    if name == "eager":  # the CPU defaults: fp32, eager, for-loop AdamW; two GPT-2 sizes with GPT-2's vocabulary
        sizes = [{"n_layer": 2, "n_head": 4, "n_embd": 128}, {"n_layer": 6, "n_head": 6, "n_embd": 384}]
        cases = [
            {**size, "seq_len": T, "micro_batch": B, "checkpointing": ckpt}
            for size in sizes
            for T in (64, 256)
            for B in (1, 4, 8, 16)
            for ckpt in (False, True)
        ]
        # a 512-token vocabulary, so that the blocks' activations, not the loss, make the peak; fp32 and bf16
        blocks = {"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 512, "seq_len": 256}
        cases += [
            {**blocks, "micro_batch": B, "checkpointing": ckpt, "precision": precision}
            for precision in ("fp32", "bf16")
            for B in (4, 16)
            for ckpt in (False, True)
        ]
        return cases
    if name == "compiled":  # the GPU recipe's step on CPU: torch.compile, bf16 autocast, fused AdamW
        gpu_like = {"precision": "bf16", "compile": True, "fused": True}
        cases = [
            {"n_layer": 2, "n_head": 4, "n_embd": 128, "seq_len": 128, "micro_batch": B, "checkpointing": ckpt}
            for B in (4, 16)
            for ckpt in (False, True)
        ]
        cases += [
            {
                "n_layer": 4,
                "n_head": 4,
                "n_embd": 256,
                "vocab_size": 512,
                "seq_len": 256,
                "micro_batch": 8,
                "checkpointing": ckpt,
            }
            for ckpt in (False, True)
        ]
        cases.append({"n_layer": 2, "n_head": 4, "n_embd": 128, "seq_len": 128, "micro_batch": 8, "compile": True})
        return [{**gpu_like, **c} if "compile" not in c else c for c in cases]
    if name == "rss":  # the allocator's figure against the operating system's, same cases
        cases = (
            [{"n_layer": 2, "n_head": 4, "n_embd": 128, "seq_len": 256, "micro_batch": B} for B in (1, 8)]
            + [{"n_layer": 6, "n_head": 6, "n_embd": 384, "seq_len": 256, "micro_batch": B} for B in (1, 8)]
            + [
                {
                    "n_layer": 4,
                    "n_head": 4,
                    "n_embd": 256,
                    "vocab_size": 512,
                    "seq_len": 256,
                    "micro_batch": 16,
                    "checkpointing": ckpt,
                }
                for ckpt in (False, True)
            ]
        )
        return [{**c, "method": m} for c in cases for m in ("alloc", "rss")]
    if name == "gpu":  # a CUDA GPU: the recipe's step (bf16, compiled, fused AdamW) at 124M and 350M
        gpu = {"method": "cuda", "precision": "bf16", "compile": True, "fused": True, "seq_len": 1024, "steps": 3}
        gpt2_124m = {"n_layer": 12, "n_head": 12, "n_embd": 768}
        gpt2_350m = {"n_layer": 24, "n_head": 16, "n_embd": 1024}
        cases = [{**gpt2_124m, "micro_batch": B} for B in (16, 64)]
        cases += [{**gpt2_350m, "micro_batch": B, "checkpointing": ckpt} for B in (8, 32) for ckpt in (False, True)]
        return [{**gpu, **c} for c in cases]
    if name == "losses":  # activation checkpointing against none: 10 optimizer steps
        return [
            {
                "n_layer": 2,
                "n_head": 4,
                "n_embd": 128,
                "seq_len": 64,
                "micro_batch": 4,
                "steps": 10,
                "checkpointing": ckpt,
                "precision": precision,
            }
            for precision in ("fp32", "bf16")
            for ckpt in (False, True)
        ]
    raise SystemExit(f"unknown grid {name!r}: eager, compiled, rss, losses or gpu")


def predict(case: dict) -> Memory:
    c = {**DEFAULT_CASE, **case}
    return estimate(
        Setup(
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_embd=c["n_embd"],
            vocab_size=c["vocab_size"],
            n_positions=c["seq_len"],
            seq_len=c["seq_len"],
            micro_batch=c["micro_batch"],
            optimizer=c["optimizer"],
            precision=c["precision"],
            compiled=c["compile"],
            checkpointing=c["checkpointing"],
            fused_optimizer=c["fused"],
        )
    )


def describe(c: dict) -> str:
    return (
        f"{c['n_layer']}x{c['n_embd']:<4} V={c['vocab_size']:<6} T={c['seq_len']:<4} B={c['micro_batch']:<3} "
        f"{'AC' if c['checkpointing'] else '--'} {c['precision']} {'compiled' if c['compile'] else 'eager'}"
        f"{' fused' if c['fused'] else ''}"
    )


def h200_prediction() -> str:
    """BENCHMARKS.md's H200 run: 124M, B=64, T=1024, bf16 autocast, torch.compile, fused AdamW, one GPU, no
    accumulation (gpu_bench.py), torch.cuda.max_memory_allocated after the warm-up: 28.6 GiB."""
    memory = estimate(
        Setup(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, n_positions=1024, seq_len=1024, micro_batch=64)
    )
    measured = 28.6 * 2**30
    return (
        f"H200 (BENCHMARKS.md: 124M, B=64, T=1024, bf16, compiled, fused AdamW, one GPU): predicted "
        f"{memory.peak / 2**30:.2f} GiB at the {memory.peak_at}, measured 28.6 GiB, ratio {memory.peak / measured:.3f}"
    )


def run_grid(name: str, out: Path | None, recorded: list[dict] | None = None) -> list[dict]:
    """Measure each case of the grid (or take `recorded` results, re-predicted by the current model) and print
    predicted against measured."""
    rows = []
    source = "recorded results" if recorded else "one subprocess per case"
    print(f"# grid {name}: {platform.platform()}, {os.cpu_count()} CPUs; {source}; MiB = 2**20 bytes")
    print(f"{'case':<58}{'predicted':>10}{'measured':>10}{'ratio':>7}  moment (predicted) / phase (measured)")
    for case in recorded or grid(name):
        result = case if recorded else run_child(case)
        c, predicted = result["case"], predict(result["case"])
        ratio = predicted.peak / result["peak_bytes"]
        phase = max(result["phase_peaks"], key=result["phase_peaks"].get) if "phase_peaks" in result else c["method"]
        print(
            f"{describe(c):<58}{predicted.peak / 2**20:>10.1f}{result['peak_bytes'] / 2**20:>10.1f}{ratio:>7.3f}  "
            f"{predicted.peak_at} / {phase}",
            flush=True,
        )
        rows.append({**result, "ratio": ratio})
    ratios = [r["ratio"] for r in rows if r["case"]["method"] == "alloc"]
    if ratios:
        print(f"ratio predicted / measured: min {min(ratios):.3f}, max {max(ratios):.3f} over {len(ratios)} cases")
    if any(r["case"]["method"] == "rss" for r in rows):  # the rss grid: each case by both methods, in turn
        for a, b in zip(rows[::2], rows[1::2], strict=True):
            print(
                f"{describe(a['case']):<58} allocator {a['peak_bytes'] / 2**20:9.1f} MiB, peak RSS growth "
                f"{b['peak_bytes'] / 2**20:9.1f} MiB, ratio {b['peak_bytes'] / a['peak_bytes']:.4f}"
            )
    _compare_losses(rows)
    print(h200_prediction())
    if out:  # the measurements only: --recorded predicts them again with the model of the day
        out.write_text(json.dumps([{k: v for k, v in r.items() if k != "ratio"} for r in rows], indent=1) + "\n")
        print(f"results: {out}")
    return rows


def _compare_losses(rows: list[dict]) -> None:
    """Activation checkpointing must not change the losses: each case with it against the same case without."""
    key = lambda c: json.dumps({k: v for k, v in c.items() if k not in ("checkpointing", "method")}, sort_keys=True)
    plain = {key(r["case"]): r["losses"] for r in rows if not r["case"]["checkpointing"]}
    diffs = [
        max(abs(x - y) for x, y in zip(r["losses"], plain[key(r["case"])], strict=True))
        for r in rows
        if r["case"]["checkpointing"] and key(r["case"]) in plain
    ]
    if diffs:
        steps = max(len(r["losses"]) for r in rows)
        print(
            f"activation checkpointing: largest loss difference {max(diffs):.2e} over {len(diffs)} pairs "
            f"({steps} steps each)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="eager", help="eager (default), compiled, rss, losses or gpu (CUDA)")
    parser.add_argument("--case", help="one case as JSON (keys of DEFAULT_CASE), run in a subprocess")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--recorded", type=Path, help="print a grid's rows written by --out, predicted again")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
    elif args.case:
        result = run_child(json.loads(args.case))
        predicted = predict(result["case"])
        print(json.dumps({**result, "predicted_bytes": predicted.peak, "predicted_at": predicted.peak_at}, indent=1))
    elif args.recorded:
        run_grid(args.recorded.stem, None, json.loads(args.recorded.read_text()))
    else:
        run_grid(args.grid, args.out)


if __name__ == "__main__":
    main()
