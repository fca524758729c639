"""HellaSwag scoring speed: examples/s batched against one example (4 rows) per forward pass.

    python bench/bench_eval.py                      # tiny model, synthetic HellaSwag-length examples, CPU
    python bench/bench_eval.py --hellaswag_file hellaswag_val.jsonl --n_layer 12 --n_embd 768 --device cuda

Same model, same examples, one process; the variants run interleaved, round after round: examples/s is the median
round, and each ratio is the median of the per-round ratios (variants of one round run back to back, so load from
other processes hits them alike). Variants:
- reference: build-nanogpt's loop, one example per forward pass, full logits at every position;
- one:       evaluate_gpt2.hellaswag_losses with batch_size=1 (one example per forward pass);
- batch=N:   evaluate_gpt2.hellaswag_losses with N examples (4N rows) per forward pass.
All variants must agree on every example's prediction; the ratios are printed at the end.

On CPU with a tiny model, the cost per example that batching cannot shrink is the LM head (scored tokens x 50257 x
n_embd); what batching removes is the per-operation overhead (dispatch, OpenMP fork/join), which is large with
several threads on a busy machine and small with --threads 1. Run both to see the range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and tests/synthetic.py

from gpt2_repro.data.tokenizer import get_gpt2_encoding
from gpt2_repro.evaluation.hellaswag import load_hellaswag, render_example
from gpt2_repro.evaluation.scoring import hellaswag_losses
from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM
from synthetic import hellaswag_examples


@torch.no_grad()
def reference_predictions(model, encoding, examples) -> torch.Tensor:
    """build-nanogpt's scoring: 4 rows per forward, zero right-padding, masked mean loss of the ending tokens."""
    device = next(model.parameters()).device
    preds = []
    for ex in examples:
        ctx = encoding.encode(ex["ctx"])
        rows = [ctx + encoding.encode(" " + e) for e in ex["endings"]]
        tokens = torch.zeros(4, max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(ctx) : len(row)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        logits = model(tokens).logits  # (4, T, V)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        shift_mask = mask[:, 1:]
        avg = (losses.view(4, -1) * shift_mask).sum(1) / shift_mask.sum(1)
        preds.append(int(avg.argmin()))
    return torch.tensor(preds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hellaswag_file", default=None, help="real examples instead of synthetic ones")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 = no OpenMP sync per op)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoding = get_gpt2_encoding()
    config = GPT2ReproConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_positions=1024)
    model = GPT2ReproForCausalLM(config).to(args.device).eval()
    if args.hellaswag_file:
        examples = load_hellaswag(args.hellaswag_file, limit=args.examples)
    else:
        examples = hellaswag_examples(args.examples, ctx_words=(10, 80), ending_words=(4, 30))
    lengths = [len(c) + max(map(len, e)) for c, e in (render_example(encoding, x) for x in examples)]
    print(
        f"model: {args.n_layer} layers x {args.n_embd} wide, vocab {config.vocab_size}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters; device {args.device}, {args.threads} threads"
    )
    print(f"{len(examples)} examples; longest row per example: {statistics.mean(lengths):.0f} tokens on average")

    def ours(batch_size):
        return lambda: (lambda r: (r[0] / r[1]).argmin(1))(hellaswag_losses(model, encoding, examples, batch_size))

    variants = {"reference": lambda: reference_predictions(model, encoding, examples), "one": ours(1)}
    variants.update({f"batch={b}": ours(b) for b in args.batch_sizes})
    want = variants["reference"]()
    for name, fn in variants.items():  # warm-up (allocator, thread pool); every variant must agree
        assert torch.equal(fn(), want), f"{name} disagrees with the reference"
    timings = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            preds = fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - start)
            assert torch.equal(preds, want), f"{name} disagrees with the reference"
    # Ratios within each round (variants run back to back) are robust to load from other processes.
    rate = {name: len(examples) / statistics.median(t) for name, t in timings.items()}
    print(f"\n{'variant':<11} {'examples/s':>10}   {'vs one: median [min-max] of rounds':<36} vs reference")
    for name, t in timings.items():
        vs_one = [one / mine for one, mine in zip(timings["one"], t, strict=True)]
        vs_ref = [ref / mine for ref, mine in zip(timings["reference"], t, strict=True)]
        spread = f"{statistics.median(vs_one):.2f}x [{min(vs_one):.2f}-{max(vs_one):.2f}]"
        print(f"{name:<11} {rate[name]:>10.1f}   {spread:<36} {statistics.median(vs_ref):.2f}x")


if __name__ == "__main__":
    main()
