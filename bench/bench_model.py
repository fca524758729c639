"""Model benchmarks, compared variants interleaved in one process.

1. Training step (forward, backward, AdamW) tokens/s: our GPT2ReproForCausalLM against transformers'
   GPT2LMHeadModel with sdpa, same shape, same batches. Target: ratio >= 1.0.
2. Generation tokens/s with the KV cache against without it, 256 new tokens, greedy. Target: >= 5x.

    python bench/bench_model.py                      # defaults: 6 layers, 384 wide, 6 heads, T=256, B=8, fp32
    python bench/bench_model.py --rounds 10 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM


@dataclasses.dataclass
class BenchConfig:
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    seq_len: int = 256
    batch_size: int = 8
    rounds: int = 6  # interleaved rounds; the median round is reported
    steps: int = 3  # timed training steps per model per round
    new_tokens: int = 256
    prompt_lens: str = "16,256,512"  # comma list: the cache pays more the longer the context it saves recomputing
    gen_rounds: int = 3
    parts: str = "train,generate"
    threads: int = 0  # 0: torch's default


def parse_args() -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(BenchConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return BenchConfig(**vars(parser.parse_args()))


def train_step(model, opt, x, y, ours: bool) -> None:
    # GPT2LMHeadModel takes the same pre-shifted targets through the shared HF loss (labels only switch it on).
    kwargs = dict(return_logits=False) if ours else dict(labels=y)
    loss = model(x, shift_labels=y, **kwargs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_training(cfg: BenchConfig) -> dict[str, float]:
    shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=max(1024, cfg.seq_len))
    torch.manual_seed(0)
    models = {}
    for vocab in (50304, 50257):  # our default (padded) and the official size, each against the same-size baseline
        models[f"ours, vocab {vocab}"] = (GPT2ReproForCausalLM(GPT2ReproConfig(**shape, vocab_size=vocab)), True)
        hf_config = GPT2Config(
            **shape, vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"
        )
        models[f"transformers GPT2LMHeadModel, vocab {vocab}"] = (GPT2LMHeadModel(hf_config), False)
    assert all(m.config._attn_implementation == "sdpa" for m, _ in models.values())
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in models.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (cfg.batch_size, cfg.seq_len + 1), generator=gen)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    for name, (model, ours) in models.items():  # warm-up: allocator, AdamW state
        model.train()
        train_step(model, opts[name], x, y, ours)
    rates: dict[str, list[float]] = {name: [] for name in models}
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    for _ in range(cfg.rounds):
        for name, (model, ours) in models.items():
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                train_step(model, opts[name], x, y, ours)
            rates[name].append(tokens / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


@torch.no_grad()
def bench_generation(cfg: BenchConfig, prompt_len: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(
        GPT2ReproConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=1024)
    ).eval()
    prompt = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False)
    outputs, rates = {}, {"with KV cache": [], "without cache": []}
    for _ in range(cfg.gen_rounds):
        for name, use_cache in (("with KV cache", True), ("without cache", False)):
            t0 = time.perf_counter()
            outputs[name] = model.generate(prompt, use_cache=use_cache, **kw)
            rates[name].append(cfg.new_tokens / (time.perf_counter() - t0))
    assert torch.equal(outputs["with KV cache"], outputs["without cache"]), "cache changed the greedy output"
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    cfg = parse_args()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {cpu}, threads {torch.get_num_threads()}")
    print(f"# {cfg}")
    if "train" in cfg.parts:
        train = bench_training(cfg)
        shape = f"{cfg.n_layer}L {cfg.n_embd}w {cfg.n_head}h, B={cfg.batch_size}, T={cfg.seq_len}"
        print(f"\nTraining step tokens/s ({shape}, fp32, median of {cfg.rounds} interleaved rounds)")
        for name, rate in train.items():
            print(f"  {name:<44} {rate:10.0f} tok/s")
        for vocab in (50304, 50257):
            ratio = train[f"ours, vocab {vocab}"] / train[f"transformers GPT2LMHeadModel, vocab {vocab}"]
            print(f"  ratio ours / transformers sdpa, vocab {vocab}: {ratio:.3f} (target >= 1.0)")
    if "generate" in cfg.parts:
        print(f"\nGeneration tokens/s ({cfg.new_tokens} new tokens, greedy, batch 1, median of {cfg.gen_rounds})")
        for prompt_len in (int(p) for p in cfg.prompt_lens.split(",")):
            gen = bench_generation(cfg, prompt_len)
            speedup = gen["with KV cache"] / gen["without cache"]
            print(
                f"  prompt {prompt_len:4d}: with KV cache {gen['with KV cache']:7.1f} tok/s, without "
                f"{gen['without cache']:7.1f} tok/s, speed-up {speedup:.2f}x (target >= 5x)"
            )


if __name__ == "__main__":
    main()
