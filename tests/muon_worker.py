"""The processes of tests/test_muon_distributed.py (run by torchrun, or alone for one process): a tiny GPT-2 trained
by the project's own optimizers (optim.build_optimizers, optim.set_lrs) on batches fixed by the step, so that any
process count sees the same global batch at every step.

    python tests/muon_worker.py accelerate OUT [--steps N] [--save_at K --save DIR] [--load DIR] [--today]
                                                [--replicate]
        accelerate (DDP over gloo with 2 processes, as train.py runs), optional save_state/load_state; writes OUT
        (rank 0): the weights after the last step, each process's Muon state and how many matrices it
        orthogonalized, the state saved or loaded
    python tests/muon_worker.py fsdp OUT
        torch's fully_shard over gloo, as accelerate's FSDP2 wraps the model (each block, then the root), against
        one-process references trained first in the same process, with the global batch split and with every
        process on the whole batch; plus a model whose matrices split unevenly, with PyTorch's bf16 Newton-Schulz;
        writes OUT (rank 0): each pair of weights, the orthogonalizations per process, the uneven shards' shapes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_repro.training.optim import build_optimizers, set_lrs  # noqa: E402  (after the repository is on the path)

GLOBAL_BATCH, SEQ, VOCAB_USED = 4, 32, 200  # sequences per step in all; tokens drawn below VOCAB_USED
OVERRIDES = {
    "max_steps": 20,
    "warmup_steps": 3,
    "muon_weight_decay": 0.1,  # weight decay on, so its arithmetic is compared too
    "muon_momentum_warmup_steps": 5,  # set_lrs moves the momentum: the resumed run must follow it
}


def config():
    from gpt2_repro.base.config import load_config

    return load_config(ROOT / "configs" / "tiny_fast.yaml", OVERRIDES)


def tiny_model():
    from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM

    torch.manual_seed(0)
    return GPT2ReproForCausalLM(
        GPT2ReproConfig(n_layer=2, n_head=2, n_embd=64, n_positions=SEQ, vocab_size=512, tokenizer_vocab_size=512)
    )


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) (GLOBAL_BATCH / world, SEQ) int64: this process's rows of the step's global batch."""
    tokens = torch.randint(0, VOCAB_USED, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    rows = tokens.chunk(world)[rank]
    return rows[:, :-1], rows[:, 1:]


def count_orthogonalizations() -> list[int]:
    """Count the calls of the Newton-Schulz function Muon calls (replaced on CPUs by build_optimizers: wrap after)."""
    calls = [0]
    inner = torch.optim._muon._zeropower_via_newtonschulz

    def counted(grad, *args):
        calls[0] += grad.numel() > 4  # not DistributedMuon's 2 x 2 dtype probe
        return inner(grad, *args)

    torch.optim._muon._zeropower_via_newtonschulz = counted
    return calls


def muon_buffers(optimizer) -> list[torch.Tensor]:
    """Copies of the momentum buffers of a (prepared) Muon, in parameter order."""
    muon = getattr(optimizer, "optimizer", optimizer)
    return [muon.state[p]["momentum_buffer"].clone() for p in muon.param_groups[0]["params"]]


def todays_muon(muon) -> torch.optim.Muon:
    """torch.optim.Muon with the same parameters and settings: every process orthogonalizes every matrix."""
    return torch.optim.Muon(muon.param_groups[0]["params"], **muon.defaults)


def run_accelerate(args) -> None:
    """train.py's way: build_optimizers on the plain model, accelerate's prepare (DDP over gloo with 2 processes),
    set_lrs at every step, accelerate's save_state/load_state."""
    from accelerate import Accelerator

    torch.set_num_threads(1)
    cfg = config()
    acc = Accelerator(cpu=True)
    raw = tiny_model()
    adamw, muon = build_optimizers(raw, cfg, acc.device)
    if args.today:
        muon = todays_muon(muon)
    model, *optimizers = acc.prepare(raw, adamw, muon)
    calls = count_orthogonalizations()
    start, record = 0, {"type": type(muon).__name__}
    if args.load:
        acc.load_state(args.load)
        start = int(Path(args.load, "step.txt").read_text())
        record["loaded"] = muon_buffers(optimizers[1])
    rank, world = (0, 1) if args.replicate else (acc.process_index, acc.num_processes)
    for step in range(start, args.steps):
        set_lrs(optimizers, step, cfg.optim)
        x, y = batch(step, rank, world)
        acc.backward(model(input_ids=x, shift_labels=y, return_logits=False).loss)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step + 1 == args.save_at:
            acc.save_state(args.save)
            record["saved"] = muon_buffers(optimizers[1])
            if acc.is_main_process:
                Path(args.save, "step.txt").write_text(str(step + 1))
    record["weights"] = {n: p.detach().clone() for n, p in raw.named_parameters()}
    every = [(muon_buffers(optimizers[1]), calls[0])]  # each process's buffers and orthogonalizations
    if acc.num_processes > 1:
        every = [None] * acc.num_processes
        torch.distributed.all_gather_object(every, (muon_buffers(optimizers[1]), calls[0]))
    if acc.is_main_process:
        torch.save({**record, "buffers": [b for b, _ in every], "calls": [c for _, c in every]}, args.out)
    # As train.py ends: every process waits for the others, then the process group is destroyed. A process that
    # exits with its gloo group alive can abort in the group's destructor ("terminate called without an active
    # exception", SIGABRT), which the launcher reports as the run's failure.
    acc.wait_for_everyone()
    acc.end_training()


class Odd(torch.nn.Module):
    """Matrices whose rows do not split evenly over 2 processes (7, 9, 5) or leave one process none (1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for i, o in [(6, 7), (7, 9), (9, 5)])
        self.head = torch.nn.Linear(5, 1, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x).square().mean()


def train(model, optimizers, steps: int, cfg, rank: int = 0, world: int = 1) -> None:
    for step in range(steps):
        set_lrs(optimizers, step, cfg.optim)
        x, y = batch(step, rank, world)
        model(input_ids=x, shift_labels=y, return_logits=False).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def train_odd(model, optimizer, rank: int = 0, world: int = 1) -> None:
    """20 steps with PyTorch's own Newton-Schulz (bfloat16, what GPUs run; not the CPU's fp32 one): the processes
    then exchange bfloat16 results."""
    from gpt2_repro.training.optim import _TORCH_NEWTON_SCHULZ

    saved = torch.optim._muon._zeropower_via_newtonschulz
    torch.optim._muon._zeropower_via_newtonschulz = _TORCH_NEWTON_SCHULZ
    try:
        for step in range(20):
            model(torch.randn(8, 6, generator=torch.Generator().manual_seed(step)).chunk(world)[rank]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.optim._muon._zeropower_via_newtonschulz = saved


def run_fsdp(args) -> None:
    """FSDP2 as accelerate applies it, against one process: with the global batch split (the real case) and with every
    process on the whole batch (the same gradients as one process: only the optimizer can differ)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from gpt2_repro.training.muon import DistributedMuon
    from modeling_gpt2_repro import GPT2ReproBlock

    torch.set_num_threads(1)
    cfg = config()
    hyper = {"lr": 0.05, "weight_decay": 0.1, "momentum": 0.9, "adjust_lr_fn": "original"}
    # The one-process references first, before the process group exists: build_optimizers gives torch.optim.Muon
    alone, odd_alone = tiny_model(), Odd()
    train(alone, build_optimizers(alone, cfg, torch.device("cpu")), cfg.optim.max_steps, cfg)
    train_odd(odd_alone, torch.optim.Muon(odd_alone.parameters(), **hyper))
    alone_params, odd_params = dict(alone.named_parameters()), dict(odd_alone.named_parameters())

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result, every = {}, []
    for split in ("split", "replicate"):
        r, w = (rank, world) if split == "split" else (0, 1)
        sharded, odd = tiny_model(), Odd()
        for module in sharded.modules():  # as accelerate's FSDP2 wraps it: each block, then the root
            if isinstance(module, GPT2ReproBlock):
                fully_shard(module)
        fully_shard(sharded)
        for layer in odd.layers:
            fully_shard(layer)
        fully_shard(odd)
        optimizers = build_optimizers(sharded, cfg, torch.device("cpu"))
        calls = count_orthogonalizations()
        train(sharded, optimizers, cfg.optim.max_steps, cfg, r, w)
        every.append(calls[0])
        train_odd(odd, DistributedMuon(odd.parameters(), **hyper), r, w)
        result[split] = {
            "type": type(optimizers[1]).__name__,
            "gpt": {n: (p.full_tensor(), alone_params[n].detach()) for n, p in sharded.named_parameters()},
            "odd": {n: (p.full_tensor(), odd_params[n].detach()) for n, p in odd.named_parameters()},
        }
    shards = {n: tuple(p.to_local().shape) for n, p in odd.named_parameters()}
    gathered = [None] * world  # each process's orthogonalizations (split, replicate) and its shards' shapes
    dist.all_gather_object(gathered, (every, shards))
    if rank == 0:
        torch.save({**result, "calls": [c for c, _ in gathered], "shards": [s for _, s in gathered]}, args.out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["accelerate", "fsdp"])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=OVERRIDES["max_steps"])
    parser.add_argument("--save_at", type=int, default=0)
    parser.add_argument("--save", default=None)
    parser.add_argument("--load", default=None)
    parser.add_argument("--today", action="store_true", help="torch.optim.Muon: every process orthogonalizes all")
    parser.add_argument("--replicate", action="store_true", help="every process trains on the whole global batch")
    args = parser.parse_args()
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    (run_accelerate if args.mode == "accelerate" else run_fsdp)(args)


if __name__ == "__main__":
    main()
