"""How much memory each GPU needs for a training run, the largest micro-batch that fits, and how long a step takes:
arithmetic on the config, before anything is built (`train.py --plan`). No torch, no GPU: it answers at once.

The model of memory below is derived from what GPT2ReproForCausalLM's forward pass keeps for its backward pass and
checked against every measured figure there is (bench/bench_memory.py; predicted / measured peak):
  40 real training steps on CPU, eager, fp32 and bf16 autocast (GPT-2s of 2 x 128 and 6 x 384 at T = 64 and 256,
      micro-batches 1-16, and 4 x 256 with a 512-token vocabulary, where the blocks make the peak; activation
      checkpointing on and off): 0.995-1.000;
  7 compiled ones (torch.compile, bf16 autocast and fused AdamW as on a GPU, and fp32): 0.93-1.00;
  the H200's `torch.cuda.max_memory_allocated` for the 124M recipe (BENCHMARKS.md: micro-batch 64, bf16, compiled,
      fused AdamW): 28.3 GiB predicted, 28.6 measured (0.99).

Notation: N parameters (the LM head is the token embedding, counted once), L layers, C = n_embd, H heads,
V = vocab_size (padded: 50304), BT = micro_batch x seq_len tokens, a = bytes of an activation in the compute dtype
(2 under bf16/fp16 autocast, 4 in fp32), r = bytes of the residual stream (4: the embeddings are fp32 and adding a
bf16 branch to an fp32 tensor gives fp32; 2 under FSDP's bf16 parameters).

Held between steps (per GPU)
  weights 4N (fp32 master weights; autocast computes from them)
  optimizer state: AdamW 8N (two fp32 moments); Muon 4 per weight of the blocks' matrices (one momentum buffer,
      12 C^2 L weights) + AdamW's 8 per other weight
  DDP (more than one process): gradient buckets 4N, beside the .grad tensors (accelerate keeps DDP's default
      gradient_as_bucket_view=False)
  FSDP (fully_shard over G GPUs): weights, gradients and optimizer state are sharded (/ G)
Alive during a step
  gradients 4N (/ G under FSDP): from the backward of an optimizer step's first micro-batch to the optimizer step
      (zero_grad(set_to_none=True) frees them); with no accumulation, only what the backward has reached so far
  activations saved for the backward, per token and layer (GPT2ReproBlock.forward):
      residual stream x into ln_1, x + attn into ln_2                          2 C r
      ln_1 output (c_attn's input) C, q k v (c_attn's output, SDPA's inputs) 3C, attention output (c_proj's input)
      C, ln_2 output (c_fc's input) C, c_fc output (GELU's input) 4C, GELU output (c_proj's input) 4C       14 C a
      fp32 statistics: two LayerNorms' mean and rstd, SDPA's log-sum-exp per head                  (4 + H) 4
    fp32: 64 C + 4(4 + H) bytes; bf16 autocast: 36 C + 4(4 + H). torch.compile keeps the same per layer (measured:
    inductor does not recompute a tensor that a matmul of the backward reads anyway).
  after the last block: ln_f's input C r and output C a, its statistics, the ids, targets and positions (int64)
  bf16 weight copies under autocast: every matmul's bf16 weight (12 C^2 L + V C, the LM head included), saved for
      the backward: 2 bytes each, until their layer's backward
  the loss, at its peak (the start of the backward), per token:
      eager: cross_entropy keeps log_softmax in fp32 (4V); its backward holds it with its gradient and the
          logits' gradient: 12 V bytes at once
      compiled: one fused kernel keeps the logits in the compute dtype (a V) and writes their gradient over them:
          a V (+ the LM head's fp32 weight gradient, 4 V C, in fp32: under autocast it takes the freed bf16 copy's
          place)
    This dominates small models: at 124M and T=1024, the fp32 log-softmax alone is 0.2 MB per token, as much as
    six layers' activations.
  activation checkpointing (transformers' own, on each GPT2ReproBlock): a block keeps only its input (C r per
      token) and runs again in the backward, so one block's activations and weight copies are alive at a time
  the backward of a block: the MLP's gradients while the block's other activations are alive (4 C a + C r per
      token beyond them; under autocast, C a more for the residual gradient's bf16 cast, and a bf16 weight
      gradient). From block to block the gradients grow and the saved activations shrink, so the largest is at the
      first block the backward reaches or at the last (with checkpointing and small micro-batches, the last: the
      gradients are nearly all there and the saved inputs are small)
  FSDP: the gathered parameters in the compute dtype: the root's (embeddings, ln_f; kept from the forward to the
      backward) and two blocks' (the current one and the one prefetched); in the backward, the same again for
      their unsharded gradients
  the optimizer step: fused AdamW (the project's choice on CUDA) works in place; PyTorch's default on CPU, a loop
      over the parameters, allocates two temporaries the size of the one it updates (the embedding: 2 x 4 V C)
Peak: the largest of three moments: the loss's backward (every saved activation, the loss's peak), a block's
  backward (the block's extra, the gradients so far) and the optimizer step (weights, state, gradients, its
  temporaries).

Not counted: the CUDA context (about 0.5 GiB outside PyTorch's allocator), NCCL's buffers and the caching
allocator's fragmentation (reserved above allocated). A micro-batch "fits" when its predicted peak stays under
`usable_bytes(gpu_memory)`: 90% of the card less 1 GiB for them.

FLOPs: per token 6 x (matmul weights) + 12 L C T, nanoGPT's and PaLM's count, the formula of
modeling_gpt2_repro.estimate_flops_per_token (repeated here: importing the model file imports transformers, seconds
this command does not need). Activation checkpointing runs the blocks' forward again: +2 (12 C^2 + 13 C) L + 4 L C T
per token of hardware FLOPs, not model FLOPs (MFU counts the model's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from ..base.cli import opt
from ..base.errors import ConfigError
from ..base.machine import PEAK_BF16_FLOPS, peak_bf16_flops

GIB = 2**30
TOKENIZER_VOCAB = 50257  # GPT-2's BPE: the official checkpoints' embedding rows
DISTRIBUTED_TYPES = ("none", "ddp", "fsdp")


# ------------------------------------------------------------------------------------------------ parameters
def parameter_count(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """GPT-2's parameters, the LM head tied to the token embedding: per block 12 C^2 + 13 C (attention 4 C^2 + 4 C,
    MLP 8 C^2 + 5 C, two LayerNorms 4 C), the token and position tables, the final LayerNorm."""
    C = n_embd
    return vocab_size * C + n_positions * C + n_layer * (12 * C * C + 13 * C) + 2 * C


def block_matrix_count(n_layer: int, n_embd: int) -> int:
    """Weights of the blocks' four matrices (c_attn, attn.c_proj, c_fc, mlp.c_proj): what Muon trains."""
    return n_layer * 12 * n_embd * n_embd


def flops_per_token(n_layer: int, n_head: int, n_embd: int, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6 x matmul weights (the tied LM head included, the position
    table not) + 12 L H D T for attention; modeling_gpt2_repro.estimate_flops_per_token's formula."""
    C, L = n_embd, n_layer
    matmul_weights = 12 * L * C * C + 13 * L * C + vocab_size * C + 2 * C
    return 6 * matmul_weights + 12 * L * n_head * (C // n_head) * seq_len


def recompute_flops_per_token(n_layer: int, n_embd: int, seq_len: int) -> float:
    """The extra FLOPs per token of activation checkpointing: the blocks' forward a second time."""
    C, L = n_embd, n_layer
    return 2 * L * (12 * C * C + 13 * C) + 4 * L * C * seq_len


# --------------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class Setup:
    """What the memory of a training step depends on. Sizes as in GPT2ReproConfig; micro_batch per GPU."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    seq_len: int
    micro_batch: int
    accumulation: int = 1  # > 1: the gradients are alive through the later micro-batches' forward and backward
    optimizer: str = "adamw"  # adamw | muon
    precision: str = "bf16"  # bf16 | fp16 (autocast, fp32 weights) | fp32
    compiled: bool = True
    checkpointing: bool = False
    fused_optimizer: bool = True  # fused AdamW (the project's on CUDA); False: PyTorch's CPU default, a for-loop
    distributed: str = "none"  # none | ddp | fsdp
    gpus: int = 1


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU. `peak` is the largest of the three moments; `peak_at` names it."""

    weights: int
    gradients: int
    optimizer_state: int
    ddp_buckets: int
    fsdp_gathered: int  # gathered parameters and their unsharded gradients, at the peak
    weight_copies: int  # autocast's bf16 copies of the matmul weights, saved for the backward
    activations: int  # saved for the backward at the end of the forward (this micro-batch)
    loss_peak: int  # the loss's tensors at the start of the backward
    moments: dict  # {"loss backward": bytes, "block backward": bytes, "optimizer step": bytes}

    @property
    def peak(self) -> int:
        return max(self.moments.values())

    @property
    def peak_at(self) -> str:
        return max(self.moments, key=self.moments.get)


def estimate(s: Setup) -> Memory:
    """Bytes per GPU of each category and the step's peak (see the module's docstring for every term)."""
    if s.optimizer not in ("adamw", "muon"):
        raise ConfigError(f"optimizer={s.optimizer!r}: the plan knows adamw and muon")
    if s.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"precision={s.precision!r}: use bf16, fp16 or fp32")
    if s.distributed not in DISTRIBUTED_TYPES:
        raise ConfigError(f"distributed={s.distributed!r}: use one of {', '.join(DISTRIBUTED_TYPES)}")
    L, H, C, V, BT = s.n_layer, s.n_head, s.n_embd, s.vocab_size, s.micro_batch * s.seq_len
    N = parameter_count(L, C, V, s.n_positions)
    block = 12 * C * C + 13 * C  # parameters of one GPT2ReproBlock
    root = N - L * block  # the rest: token and position tables (= LM head), ln_f
    mixed = s.precision != "fp32"
    fsdp, shards = s.distributed == "fsdp", s.gpus if s.distributed == "fsdp" else 1
    a = 2 if mixed else 4
    r = 2 if (fsdp and mixed) else 4  # FSDP computes from bf16 parameters: the embeddings, hence the stream, are bf16

    weights = 4 * N // shards
    matrices = block_matrix_count(L, C) if s.optimizer == "muon" else 0
    state = (4 * matrices + 8 * (N - matrices)) // shards
    grads = 4 * N // shards
    buckets = 4 * N if s.distributed == "ddp" and s.gpus > 1 else 0
    held = weights + state + buckets

    # activations saved for the backward
    layer = BT * (2 * C * r + 14 * C * a + 4 * (4 + H))
    checkpoint_input = BT * C * r
    head = BT * (C * r + C * a + 8 + 16) + 8 * s.seq_len  # ln_f in and out, its statistics; ids, targets, positions
    saved_blocks = L * (checkpoint_input if s.checkpointing else layer)
    activations = saved_blocks + head

    # autocast's bf16 copies of the matmul weights (FSDP's bf16 parameters need none; the biases' are not saved)
    copies_block = 2 * 12 * C * C if mixed and not fsdp else 0
    copies_head = 2 * V * C if mixed and not fsdp else 0
    saved_copies = copies_head + (0 if s.checkpointing else L * copies_block)

    # compiled: one fused kernel, the logits in the compute dtype and their gradient written over them; eager:
    # log_softmax (fp32), its gradient and the logits' gradient
    loss = BT * V * a + (0 if mixed else 4 * V * C) if s.compiled else BT * V * 12

    # FSDP: the root's gathered parameters from the forward to the backward, two blocks' at a time, and as many
    # unsharded gradients in the backward
    gathered_root = a * root if fsdp else 0
    gathered_blocks = 2 * a * block if fsdp else 0

    # A block's backward, at the first block (L-1) and the last (0) it reaches: the gradients grow by a block's at
    # each, the saved activations shrink by a layer's (with checkpointing, by an input only), so the largest is at
    # one of the two ends.
    accumulating = s.accumulation > 1
    grads_at_loss = grads if accumulating else 0
    # at the MLP's backward, the block's own gradients are mlp.c_proj's (4 C^2 + C)
    mlp_proj = 4 * C * C + C
    grads_first = grads if accumulating else 4 * (V * C + 2 * C + mlp_proj) // shards  # the head's and those
    grads_last = grads if accumulating else 4 * (V * C + 2 * C + (L - 1) * block + mlp_proj) // shards
    per_layer = checkpoint_input if s.checkpointing else layer
    per_layer_copies = 0 if s.checkpointing else copies_block
    recomputed = (layer - checkpoint_input + copies_block) if s.checkpointing else 0
    # the MLP's gradients beyond the block's activations; under autocast also the residual's gradient cast to bf16
    # for the matmul and a weight's bf16 gradient before it is added to the fp32 one
    extra = BT * (4 * C * a + C * r) + (BT * C * a + 2 * 4 * C * C if mixed else 0)
    in_block = held + recomputed + extra + 2 * (gathered_root + gathered_blocks)
    moments = {
        "loss backward": held + grads_at_loss + activations + saved_copies + loss + gathered_root + gathered_blocks,
        "block backward": in_block
        + max(grads_first + L * (per_layer + per_layer_copies), grads_last + per_layer + per_layer_copies),
        "optimizer step": held + grads + _optimizer_temporaries(s) // shards,
    }
    return Memory(
        weights=weights,
        gradients=grads,
        optimizer_state=state,
        ddp_buckets=buckets,
        fsdp_gathered=2 * (gathered_root + gathered_blocks),
        weight_copies=L * copies_block + copies_head,
        activations=activations,
        loss_peak=loss,
        moments=moments,
    )


def _optimizer_temporaries(s: Setup) -> int:
    """Bytes the optimizer step allocates for itself: none fused; PyTorch's for-loop AdamW (its default on CPU)
    `exp_avg_sq.sqrt() / bias_correction`, two temporaries the size of the largest tensor it updates (the token
    embedding, under Muon too). Muon's Newton-Schulz iterations work on one matrix at a time: negligible."""
    if s.fused_optimizer:
        return 0
    return 2 * 4 * max(s.vocab_size * s.n_embd, 4 * s.n_embd * s.n_embd)


# ----------------------------------------------------------------------------------------- fitting a micro-batch
def usable_bytes(gpu_memory_bytes: int) -> int:
    """What the planned tensors may take of a card: 90% less 1 GiB (CUDA context, NCCL, allocator fragmentation)."""
    return int(0.9 * gpu_memory_bytes) - GIB


def micro_batch_candidates(total_batch_tokens: int, seq_len: int, gpus: int) -> list[int]:
    """Every micro-batch that gives a whole accumulation: the divisors of total_batch_tokens / (seq_len x gpus)."""
    per_sequence = seq_len * gpus
    if total_batch_tokens % per_sequence:
        raise ConfigError(
            f"total_batch_tokens={total_batch_tokens} is not a multiple of seq_len x GPUs = {seq_len} x {gpus}: no "
            f"micro-batch gives a whole accumulation. Use a multiple of {per_sequence}."
        )
    sequences = total_batch_tokens // per_sequence
    return [b for b in range(1, sequences + 1) if sequences % b == 0]


def largest_micro_batch(s: Setup, total_batch_tokens: int, usable: int) -> tuple[int, int, Memory] | None:
    """(micro_batch, accumulation, memory) of the largest micro-batch whose peak fits in `usable` bytes, or None when
    not even one sequence fits."""
    sequences = total_batch_tokens // (s.seq_len * s.gpus)
    best = None
    for b in micro_batch_candidates(total_batch_tokens, s.seq_len, s.gpus):
        memory = estimate(replace(s, micro_batch=b, accumulation=sequences // b))
        if memory.peak > usable:
            break  # the peak grows with the micro-batch
        best = (b, sequences // b, memory)
    return best


# ------------------------------------------------------------------------------------------------ command line
def parse_memory(text: str) -> int:
    """Bytes from '80GB', '80 GiB', '141gb', '80' (GiB) or '85899345920B'. GB means GiB here, as GPU names use it:
    an "80GB" H100 has 79.2 GiB, a "141GB" H200 140.4 GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t|b)?\s*", str(text).lower())
    if not m or float(m[1]) <= 0:
        raise ConfigError(f"--gpu_memory {text!r}: give the memory of one GPU, e.g. 80GB, 141GB or 24GiB")
    unit = {"b": 1, "m": 2**20, "g": GIB, "t": 2**40}[(m[2] or "g")[0]]
    return int(float(m[1]) * unit)


def normalize_distributed(distributed_type: str | None, gpus: int) -> str:
    """'ddp', 'fsdp' or 'none' from the option (accelerate's names too: MULTI_GPU, FSDP, NO); default: DDP on several
    GPUs, none on one."""
    if distributed_type is None:
        return "ddp" if gpus > 1 else "none"
    value = {"multi_gpu": "ddp", "no": "none"}.get(distributed_type.lower(), distributed_type.lower())
    if value not in DISTRIBUTED_TYPES:
        raise ConfigError(f"--distributed_type {distributed_type!r}: use ddp (accelerate's MULTI_GPU), fsdp or none")
    return value


def gpu_peak_flops(gpu: str) -> float:
    """Dense bf16 FLOP/s of the GPU `gpu` names ('H100', 'H100 PCIe', 'A100', ...), from run_info's table."""
    peak = peak_bf16_flops(gpu)
    if peak is None:
        known = ", ".join(name for name, _ in PEAK_BF16_FLOPS)
        raise ConfigError(f"--gpu {gpu!r} is not in the table of peaks ({known}): pass --peak_tflops instead")
    return peak


@dataclass
class PlanOptions:
    """--plan: the memory plan of the config instead of a run (these options are not part of the run's config)"""

    plan: bool = opt(
        False,
        "print the memory plan (bytes per GPU, the largest micro-batch that fits, step time) and exit: no GPU, "
        "data or run folder is touched",
    )
    gpu_memory: str = opt("80GB", "--plan: memory of one GPU (80GB, 141GB, 24GiB; GB means GiB, as GPU names use it)")
    gpus: int = opt(1, "--plan: GPUs (processes) of the run")
    distributed_type: str | None = opt(None, "--plan: ddp, fsdp or none (default: ddp on several GPUs, none on one)")
    mfu: float = opt(0.4, "--plan: model FLOPs utilization the step time assumes")
    gpu: str = opt("H100", "--plan: the GPU whose dense bf16 peak the step time assumes (--peak_tflops overrides)")

    def validate(self) -> None:
        """The settings are --plan's alone: given without it (`--gpus 8` meant to start 8 processes?) they are
        refused rather than ignored; each is checked as the plan reads it."""
        if not self.plan:
            given = [f"--{f.name}" for f in fields(self) if f.name != "plan" and getattr(self, f.name) != f.default]
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: {'options' if len(given) > 1 else 'an option'} of --plan (the memory plan, "
                    "which trains nothing): add --plan. A run's GPUs are the launcher's processes: "
                    "`accelerate launch --num_processes N train.py ...`"
                )
        _check_plan_numbers(self.gpus, self.mfu)
        parse_memory(self.gpu_memory)
        normalize_distributed(self.distributed_type, self.gpus)


def _check_plan_numbers(gpus: int, mfu: float) -> None:
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: give the number of GPUs (processes) of the run, at least 1")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: give a fraction in (0, 1], e.g. 0.4")


def print_plan(cfg, options: PlanOptions) -> None:
    """What `train.py --plan` prints."""
    print(
        plan_report(
            cfg, parse_memory(options.gpu_memory), options.gpus, options.distributed_type, options.mfu, options.gpu
        )
    )


def setup_from_config(cfg, gpus: int, distributed: str, **changes) -> Setup:
    """The Setup a TrainConfig asks for on CUDA GPUs: mixed_precision auto = bf16, compile None = on, fused AdamW."""
    m, d, run = cfg.model, cfg.data, cfg.run
    precision = {"auto": "bf16", "no": "fp32"}.get(run.mixed_precision, run.mixed_precision)
    sequences = d.total_batch_tokens // (d.seq_len * gpus)
    setup = Setup(
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        vocab_size=m.vocab_size,
        n_positions=m.n_positions,
        seq_len=d.seq_len,
        micro_batch=d.micro_batch_size,
        accumulation=max(1, sequences // d.micro_batch_size),
        optimizer=cfg.optim.optimizer,
        precision=precision,
        compiled=run.compile is not False,
        checkpointing=run.gradient_checkpointing,
        distributed=distributed,
        gpus=gpus,
    )
    return replace(setup, **changes)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n else "-"


def _row(name: str, cells: list[str]) -> str:
    return f"  {name:<44}" + "".join(f"{cell:>15}" for cell in cells)


def plan_report(
    cfg, gpu_memory_bytes: int, gpus: int = 1, distributed_type: str | None = None, mfu: float = 0.4, gpu: str = "H100"
) -> str:
    """The memory plan of a TrainConfig as printed text: parameters; per GPU, weights, gradients, optimizer state and
    activations under DDP and FSDP; the peak at the config's micro-batch and the largest micro-batch that fits, each
    eager and compiled, with and without activation checkpointing; FLOPs per token and the step time at `mfu` of
    `gpu`'s dense bf16 peak (the config's peak_tflops when set)."""
    _check_plan_numbers(gpus, mfu)
    distributed = normalize_distributed(distributed_type, gpus)
    m, d = cfg.model, cfg.data
    if m.n_embd % m.n_head:  # the model's own check imports transformers; this one is all the plan needs
        raise ConfigError(f"n_embd={m.n_embd} is not divisible by n_head={m.n_head}: every head needs the same width")
    micro_batch_candidates(d.total_batch_tokens, d.seq_len, gpus)  # refuses a batch that does not divide first
    base = setup_from_config(cfg, gpus, distributed)
    usable = usable_bytes(gpu_memory_bytes)
    columns = [distributed] + [t for t in ("ddp", "fsdp") if gpus > 1 and t != distributed]
    lines = _plan_header(cfg, base, gpu_memory_bytes, usable, gpus, distributed)
    lines += _plan_tables(cfg, base, usable, columns, distributed)
    return "\n".join(lines + _plan_time(cfg, gpus, mfu, gpu))


_LABEL = {"none": "1 GPU", "ddp": "DDP", "fsdp": "FSDP"}


def _plan_header(cfg, base: Setup, gpu_memory_bytes: int, usable: int, gpus: int, distributed: str) -> list[str]:
    """The model, its parameters, the GPUs and the batch arithmetic."""
    m, d = cfg.model, cfg.data
    total, seq = d.total_batch_tokens, d.seq_len
    N = parameter_count(m.n_layer, m.n_embd, m.vocab_size, m.n_positions)
    official = parameter_count(m.n_layer, m.n_embd, TOKENIZER_VOCAB, m.n_positions)
    padding = f" ({official:,} with GPT-2's {TOKENIZER_VOCAB:,}-row head: padding adds {N - official:,})"
    precision = "fp32" if base.precision == "fp32" else f"{base.precision} autocast"
    adamw = f"AdamW ({'fused' if base.fused_optimizer else 'for-loop'})"
    optimizer = adamw if base.optimizer == "adamw" else f"Muon + {adamw}"
    plural = "s" if gpus > 1 else ""
    return [
        f"Memory plan (no GPU touched): GPT-2 {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads, "
        f"vocab {m.vocab_size:,}, context {m.n_positions:,}",
        f"  parameters {N:,}" + (padding if official != N else ""),
        f"  {gpus} x {gpu_memory_bytes / GIB:.0f} GiB GPU{plural}, {_LABEL[distributed]}, {precision}, "
        f"{optimizer}; {_gib(usable)} usable per GPU (90% less 1 GiB: CUDA context, allocator fragmentation)",
        f"  {total:,} tokens per step = micro-batch {d.micro_batch_size} x {seq:,} tokens x {gpus} GPU{plural} x "
        f"accumulation {base.accumulation} (none at micro-batch {total // (seq * gpus)})",
    ]


def _plan_tables(cfg, base: Setup, usable: int, columns: list[str], distributed: str) -> list[str]:
    """Bytes per GPU by category, activations per sequence, the peak at the config's micro-batch and the largest
    micro-batch that fits, each eager and compiled, with and without activation checkpointing."""
    d, labels = cfg.data, [_LABEL[t] for t in columns]
    per_type = {t: estimate(replace(base, distributed=t)) for t in columns}
    state = "AdamW: 2 moments" if base.optimizer == "adamw" else "Muon + AdamW"
    lines = ["", _row("bytes per GPU", labels)]
    for name, get in [
        ("weights (fp32)", lambda x: x.weights),
        ("gradients (fp32)", lambda x: x.gradients),
        (f"optimizer state ({state})", lambda x: x.optimizer_state),
        ("DDP gradient buckets", lambda x: x.ddp_buckets),
        ("FSDP gathered parameters and gradients", lambda x: x.fsdp_gathered),
        ("bf16 weight copies (autocast)", lambda x: x.weight_copies),
    ]:
        lines.append(_row(name, [_gib(get(per_type[t])) for t in columns]))
    variants = {
        (c, k): f"{'compiled' if c else 'eager'}, {'activation checkpointing' if k else 'no checkpointing'}"
        for k in (False, True)
        for c in (False, True)
    }
    lines += ["", _row(f"per sequence of {d.seq_len:,} tokens ({_LABEL[distributed]})", ["activations", "loss peak"])]
    for (compiled, ckpt), name in variants.items():
        one = estimate(replace(base, micro_batch=1, compiled=compiled, checkpointing=ckpt))
        lines.append(_row(name, [_gib(one.activations), _gib(one.loss_peak)]))
    lines += ["", _row(f"peak at micro-batch {d.micro_batch_size} ('!': does not fit)", labels)]
    for (compiled, ckpt), name in variants.items():
        cells = [estimate(replace(base, distributed=t, compiled=compiled, checkpointing=ckpt)).peak for t in columns]
        lines.append(_row(name, [_gib(x) + (" !" if x > usable else "") for x in cells]))
    lines += ["", _row("largest micro-batch that fits (accumulation)", labels)]
    for (compiled, ckpt), name in variants.items():
        fits = [
            largest_micro_batch(
                replace(base, distributed=t, compiled=compiled, checkpointing=ckpt), d.total_batch_tokens, usable
            )
            for t in columns
        ]
        lines.append(_row(name, ["none fits" if fit is None else f"{fit[0]} (x{fit[1]})" for fit in fits]))
    return lines


def _plan_time(cfg, gpus: int, mfu: float, gpu: str) -> list[str]:
    """FLOPs per token and the step time at `mfu` of the GPU's dense bf16 peak."""
    m, total, seq = cfg.model, cfg.data.total_batch_tokens, cfg.data.seq_len
    peak_tflops = getattr(cfg.run, "peak_tflops", None)
    peak, peak_name = (peak_tflops * 1e12, "--peak_tflops") if peak_tflops else (gpu_peak_flops(gpu), gpu)
    flops = flops_per_token(m.n_layer, m.n_head, m.n_embd, m.vocab_size, seq)
    extra = recompute_flops_per_token(m.n_layer, m.n_embd, seq)
    step = total * flops / (gpus * peak * mfu)
    return [
        "",
        f"FLOPs per token {flops / 1e9:.2f} G (6 x matmul weights + 12 L C T), {total * flops / 1e15:.2f} PFLOP "
        "per step",
        f"step time at {mfu:.0%} MFU of {gpus} x {peak / 1e12:.0f} TFLOP/s ({peak_name}, dense bf16): {step:.3f} s; "
        f"{cfg.optim.max_steps:,} steps: {step * cfg.optim.max_steps / 3600:.1f} h",
        f"  activation checkpointing runs the blocks' forward again: +{extra / flops:.0%} FLOPs, "
        f"{step * (1 + extra / flops):.3f} s per step at the same utilization",
    ]
