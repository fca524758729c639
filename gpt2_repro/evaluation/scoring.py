"""Evaluation kernels: validation loss and HellaSwag scores for any causal LM, and loading one to evaluate.

Two measurements, what evaluate_gpt2.py reports and what the training loop logs:
- `validation_loss`: token-weighted mean cross-entropy over a fixed budget of tokens of the val shards written by
  data_prep.py, or of a text stream's first tokens (the same tokens as its val shard would hold; what a streamed
  training run validates on), the same windows for every model and process count;
- `score_hellaswag` (10,042 validation examples, `hellaswag.py`), scored as build-nanogpt / llm.c do: each
  ending's tokens (" " + ending, GPT-2 BPE via tiktoken) follow the context; the ending with the lowest mean
  cross-entropy per token wins (`acc_norm`, OpenAI's GPT-2 124M: 0.2955), or the lowest summed cross-entropy
  (`acc`: 0.2859). The counting is done by the `evaluate` metric kept in metrics/hellaswag_accuracy (loaded from
  that path, so it works offline).

Probabilities are over the tokenizer's 50,257 ids: a model whose embedding is padded (50304 rows) is scored on the
first 50,257 logits, which is exact for our model (its padding ids get zero probability) and for OpenAI's.

Both take the model as the trainer holds it (accelerate-prepared, DDP, torch.compile'd) and evaluate the plain
module inside, in eval mode, without grads. A model sharded by FSDP2 (torch's fully_shard, accelerate's FSDP with
fsdp_version 2) is evaluated by every process together: each runs the forward on its share of the windows or
examples, and as many forwards as the busiest process (one without a batch left runs a one-token pass), since each
forward gathers the parameters with all of them; the sums are reduced as without FSDP, so the figures are those of
one process holding the same weights.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..base.errors import EvaluationInputError
from ..data.tokenizer import EOT_ID, GPT2_VOCAB_SIZE
from ..data.windows import iter_val_batches, val_batch_counts
from .hellaswag import render_example
from .models import check_vocab, context_length, is_fully_sharded, reshard

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "hellaswag_accuracy"


PAD_ID = EOT_ID  # any id would do: padded positions are never scored


# Positions per LM-head matmul, bounding the (chunk, 50257) fp32 logits. On CPU a block above glibc's mmap threshold
# goes back to the OS when freed and is page-faulted in again for the next chunk (measured: 2-3x slower per token),
# so CPU blocks stay at 64 x 50257 x 4 B = 13 MB; GPU caching allocators have no such cost.
HEAD_CHUNK = {"cpu": 64}


HEAD_CHUNK_DEFAULT = 2048


FAST_MODEL_TYPES = ("gpt2", "gpt2_repro")  # backbone returns post-LayerNorm states, head is a plain nn.Linear


# ------------------------------------------------------------------------------------------ model plumbing


def _model_to_run(model, accelerator=None):
    """(module, fast, sharded): the plain transformers model inside DDP / torch.compile wrappers, whether its backbone
    and LM head can be called separately (then only the scored positions go through the head), and whether FSDP2
    shards it (then every process must run every forward: see the module's docstring)."""
    from accelerate.utils import DistributedType, extract_model_from_parallel

    net = extract_model_from_parallel(model, keep_torch_compile=False)  # eager: no recompiles per batch shape
    sharded = is_fully_sharded(net)
    if accelerator is not None and not sharded:
        zero3 = getattr(getattr(accelerator.state, "deepspeed_plugin", None), "zero_stage", 0) == 3
        if accelerator.distributed_type == DistributedType.FSDP or zero3:  # FSDP1's flat parameters, ZeRO-3
            raise NotImplementedError(
                "validation_loss/score_hellaswag need the whole model in every process (one process, DDP) or a "
                "model sharded by FSDP2 (fsdp_version: 2); with FSDP1 or ZeRO-3, save a checkpoint and run "
                "evaluate_gpt2.py on it."
            )
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    fast = getattr(net.config, "model_type", None) in FAST_MODEL_TYPES and isinstance(head, torch.nn.Linear)
    return net, fast, sharded


@contextlib.contextmanager
def _evaluating(model, accelerator=None):
    """Eval mode, no grads, the trainer's autocast; the train/eval mode is restored afterwards, and an FSDP2 model's
    parameters are sharded again (models.reshard)."""
    was_training = model.training
    model.eval()
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        model.train(was_training)
        reshard(model)


def _token_losses(
    net, fast, input_ids, targets, rows=None, cols=None, n_vocab=GPT2_VOCAB_SIZE, sharded=False
) -> torch.Tensor:
    """Cross-entropy (fp32, nats) of each target given the tokens before it. (P,)

    input_ids (R, T). With rows/cols (P,): target p is predicted at input_ids[rows[p], cols[p]]; without them every
    position is scored and targets is (R, T). -100 targets give 0. Logits are cut to the first n_vocab ids.
    """
    R, T = input_ids.shape
    if fast:  # backbone once, LM head only on the scored positions, in chunks (no (R, T, V) logits tensor)
        hidden = _hidden_states(net, input_ids, sharded)  # (R, T, C)
        h = hidden.reshape(R * T, -1) if rows is None else hidden[rows, cols]  # (P, C)
        head = net.get_output_embeddings()
        weight, bias = _whole(head.weight)[:n_vocab], None if head.bias is None else _whole(head.bias)[:n_vocab]
        targets = targets.reshape(-1)
        chunk, losses = HEAD_CHUNK.get(h.device.type, HEAD_CHUNK_DEFAULT), []
        for i in range(0, h.shape[0], chunk):
            logits = F.linear(h[i : i + chunk], weight, bias).float()  # (chunk, n_vocab)
            losses.append(F.cross_entropy(logits, targets[i : i + chunk], reduction="none"))
        return torch.cat(losses)
    # Any causal LM: its own forward; logits_to_keep (transformers' standard kwarg) skips positions before cols.min().
    keep = T if rows is None else T - int(cols.min())
    try:
        logits = net(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep
        logits = net(input_ids=input_ids, use_cache=False).logits
    offset = T - logits.shape[1]  # the model may return all T positions anyway
    logits = logits.reshape(R * T, -1) if rows is None else logits[rows, cols - offset]  # (P, V)
    return F.cross_entropy(logits[:, :n_vocab].float(), targets.reshape(-1), reduction="none")


def _hidden_states(net, input_ids, sharded: bool) -> torch.Tensor:
    """The backbone's last hidden states (R, T, C), post-LayerNorm.

    Under FSDP2 the backbone cannot be called alone: the whole model's forward is what gathers the parameters
    outside the blocks (accelerate shards the embeddings, ln_f and the tied head as groups of the root's, whose
    hooks a call into the backbone skips or mistakes for the root: measured, "FSDP requires a single root module").
    So the model runs whole, keeping the logits of the last position only, and the backbone's output is taken on
    its way out.
    """
    if not sharded:
        return net.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    captured = []
    handle = net.base_model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        net(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as a whole tensor. FSDP2 leaves the head's weight gathered after the model's forward (accelerate
    and fully_shard's default do not reshard the root's groups after it); a layout that does reshard gives a
    DTensor, gathered here (a collective, reached by every process alike)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _idle_forward(net, fast, device) -> None:
    """A one-token forward whose result is dropped: under FSDP2 a process with no batch left runs it, so that every
    process runs as many forwards (and gathers) as the busiest."""
    one = torch.full((1, 1), PAD_ID, dtype=torch.long, device=device)
    _token_losses(net, fast, one, one, sharded=True)


def _batch_rows(rendered: list, pad_id: int):
    """Rows of one forward pass: every ending after its context, right-padded.

    Returns input_ids (R, T), and for each scored token its row, its position (which predicts it) and its id.
    Padding sits after every scored position, so causal attention never lets it change a scored logit.
    """
    seqs = [ctx + end for ctx, ends in rendered for end in ends]
    starts = [len(ctx) - 1 for ctx, ends in rendered for _ in ends]  # position predicting the ending's 1st token
    T = max(len(s) for s in seqs) - 1
    flat, rows, cols, targets = [], [], [], []
    for r, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        flat += seq[:-1] + [pad_id] * (T + 1 - len(seq))
        rows += [r] * (len(seq) - 1 - start)
        cols += range(start, len(seq) - 1)
        targets += seq[start + 1 :]
    as_long = functools.partial(torch.tensor, dtype=torch.long)
    return as_long(flat).view(len(seqs), T), as_long(rows), as_long(cols), as_long(targets)


# ------------------------------------------------------------------------------------------------- HellaSwag


def hellaswag_losses(
    model, encoding, examples: list[dict], batch_size: int = 32, accelerator=None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of each ending's tokens, for every example, gathered from all processes.

    Returns (losses (N, 4) float64 nats, lengths (N, 4) int64 tokens, labels (N,) int64), in the order of
    `examples`. Process k scores examples k, k + P, k + 2P, ...; uneven splits are exact (padding rows dropped).
    Examples are sorted by length before batching, so little padding is computed.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    net, fast, sharded = _model_to_run(model, accelerator)
    check_vocab(net, encoding.n_vocab)
    device = accelerator.device if accelerator else next(net.parameters()).device
    max_len = context_length(net)
    mine = list(range(rank, len(examples), world))
    rendered = {i: render_example(encoding, examples[i], max_len) for i in mine}
    mine.sort(key=lambda i: len(rendered[i][0]) + max(map(len, rendered[i][1])))
    # One row per example: index, label, 4 summed losses, 4 lengths (float64 holds the integers exactly).
    local = torch.zeros(len(mine), 10, dtype=torch.float64)
    batches = range(0, len(mine), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="HellaSwag", disable=rank != 0)
    with _evaluating(model, accelerator):
        for b in batches:
            ids = mine[b : b + batch_size]
            input_ids, rows, cols, targets = (t.to(device) for t in _batch_rows([rendered[i] for i in ids], PAD_ID))
            nll = _token_losses(net, fast, input_ids, targets, rows, cols, encoding.n_vocab, sharded)
            row_loss = torch.zeros(len(ids) * 4, device=device).index_add_(0, rows, nll)  # fp32, as build-nanogpt
            local[b : b + len(ids), 0] = torch.tensor(ids, dtype=torch.float64)
            local[b : b + len(ids), 1] = torch.tensor([examples[i]["label"] for i in ids], dtype=torch.float64)
            local[b : b + len(ids), 2:6] = row_loss.view(-1, 4).cpu().double()
            local[b : b + len(ids), 6:10] = torch.tensor([[len(e) for e in rendered[i][1]] for i in ids]).double()
        if sharded:  # as many forwards as process 0, which has the most examples
            busiest = -(-len(range(0, len(examples), world)) // batch_size)
            for _ in range(busiest - len(range(0, len(mine), batch_size))):
                _idle_forward(net, fast, device)
    if accelerator is not None and world > 1:
        padded = accelerator.pad_across_processes(local.to(device), dim=0, pad_index=-1)
        local = accelerator.gather(padded).cpu()
        local = local[local[:, 0] >= 0]
    local = local[local[:, 0].argsort()]
    if not torch.equal(local[:, 0], torch.arange(len(examples), dtype=torch.float64)):
        raise RuntimeError(f"Gathered {len(local)} HellaSwag results for {len(examples)} examples.")
    return local[:, 2:6], local[:, 6:10].long(), local[:, 1].long()


@functools.lru_cache(maxsize=1)
def hellaswag_metric():
    """The repository's evaluate metric (acc, acc_norm), loaded from its local path: no Hub needed."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def score_hellaswag(
    model, encoding, examples: list[dict], batch_size: int = 32, accelerator=None, progress: bool = False
) -> dict:
    """HellaSwag accuracy: {"acc", "acc_norm", "n"} (the same on every process)."""
    losses, lengths, labels = hellaswag_losses(model, encoding, examples, batch_size, accelerator, progress)
    return hellaswag_metric().compute(
        ending_losses=losses.tolist(), ending_lengths=lengths.tolist(), references=labels.tolist()
    )


# ---------------------------------------------------------------------------------------------- validation


def validation_loss(model, data, val_tokens: int, batch_size: int, seq_len: int, accelerator=None) -> float:
    """Mean cross-entropy per token over the first `val_tokens` validation tokens.

    `data`: a folder (or glob) of data_prep.py shards, or the first tokens of the validation set as an array (a
    stream's: `stream_validation_tokens`, `StreamingTokenLoader.validation_tokens`). Token-weighted (sum of
    losses / number of tokens, summed over processes with accelerator.reduce), so the figure is the same
    whatever the process count and batch size.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    net, fast, sharded = _model_to_run(model, accelerator)
    check_vocab(net)
    device = accelerator.device if accelerator else next(net.parameters()).device
    if (max_len := context_length(net)) is not None and seq_len > max_len:
        raise EvaluationInputError(
            f"seq_len={seq_len} is longer than the model's context ({max_len}): pass seq_len<={max_len}."
        )
    loss_sum, n_tokens = (0.0, 0)  # nats and scored tokens; each batch's fp32 sum is accumulated in float64 here
    batches = 0
    with _evaluating(model, accelerator):
        for x, y in iter_val_batches(data, batch_size, seq_len, val_tokens, rank=rank, world_size=world):
            x, y = x.to(device), y.to(device)
            loss_sum += _token_losses(net, fast, x, y, n_vocab=GPT2_VOCAB_SIZE, sharded=sharded).sum().item()
            n_tokens += int((y != -100).sum())
            batches += 1
        if sharded:  # as many forwards as the busiest process
            for _ in range(max(val_batch_counts(val_tokens, seq_len, batch_size, world)) - batches):
                _idle_forward(net, fast, device)
    totals = torch.tensor([loss_sum, n_tokens], dtype=torch.float64)  # on the host: MPS has no float64
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals.to(device), reduction="sum").cpu()
    if totals[1] == 0:
        raise EvaluationInputError(
            "No validation tokens were read: the validation data is empty or shorter than one window "
            f"of seq_len={seq_len} + 1 tokens."
        )
    return (totals[0] / totals[1]).item()


def stream_validation_tokens(source: tuple, encoding, val_tokens: int, seq_len: int) -> np.ndarray:
    """The first tokens of a text stream that the validation budget needs (a streamed training run's val set).

    source: (dataset, config name, split, text column), as `text_stream.open_text_stream` takes them.
    """
    from ..data.text_stream import open_text_stream, read_stream_head

    need = val_tokens // seq_len * seq_len + 1
    return read_stream_head(open_text_stream(*source).dataset, source[3], encoding, need)[0]
