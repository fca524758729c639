"""Did my run reproduce GPT-2? Validation loss and HellaSwag for any causal LM, side by side with OpenAI's GPT-2.

    python evaluate_gpt2.py --model runs/gpt2-124m/export --data_dir data/fineweb-edu-10BT --compare gpt2
    python evaluate_gpt2.py --model runs/x/export --dataset HuggingFaceFW/fineweb-edu   # a stream's first tokens
    accelerate launch evaluate_gpt2.py --model gpt2 --hellaswag_file hellaswag_val.jsonl   # several processes

Two measurements, each run when its data can be had:
- validation loss: token-weighted mean cross-entropy over a fixed budget of tokens of the val shards written by
  data_prep.py, or of a text stream's first tokens (the same tokens as its val shard would hold; what a streamed
  training run validates on), the same windows for every model and process count;
- HellaSwag (10,042 validation examples), scored as build-nanogpt / llm.c do: each ending's tokens (" " + ending,
  GPT-2 BPE via tiktoken) follow the context; the ending with the lowest mean cross-entropy per token wins
  (`acc_norm`, OpenAI's GPT-2 124M: 0.2955), or the lowest summed cross-entropy (`acc`: 0.2859). The counting is
  done by the `evaluate` metric kept in metrics/hellaswag_accuracy (loaded from that path, so it works offline).

Probabilities are over the tokenizer's 50,257 ids: a model whose embedding is padded (50304 rows) is scored on the
first 50,257 logits, which is exact for our model (its padding logits are -inf) and for OpenAI's.

`validation_loss` and `score_hellaswag` are what the training loop calls; they take the model as the trainer holds
it (accelerate-prepared, DDP, torch.compile'd) and evaluate the plain module inside, in eval mode, without grads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

import cli
from atomic_io import atomic_write, write_atomic, write_json_atomic
from cli import ConfigError, opt
from gpt2_tokenizer import EOT_ID, GPT2_VOCAB_SIZE
from hub import (
    GPT2_124M,
    GPT3_124M,
    HELLASWAG_HUB_ID,
    HELLASWAG_URL,
    HELLASWAG_VAL_SIZE,
    hub_reachable,
    manifest_source,
    update_model_card,
)
from stopping import nonfinite_parameters
from token_data import DataError, iter_val_batches

logger = logging.getLogger("evaluate_gpt2")

URL_ENV = "GPT2_REPRO_HELLASWAG_URL"  # a mirror of hellaswag_val.jsonl
CACHE_ENV = "GPT2_REPRO_CACHE"  # where downloads are cached (default ~/.cache/gpt2_repro)
METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "hellaswag_accuracy"
BUILD_NANOGPT_VAL_TOKENS = (
    20 * 64 * 1024 * 8
)  # 10,485,760: its val budget (20 steps of 64 x 1024 on 8 GPUs)

PAD_ID = EOT_ID  # any id would do: padded positions are never scored
# Positions per LM-head matmul, bounding the (chunk, 50257) fp32 logits. On CPU a block above glibc's mmap threshold
# goes back to the OS when freed and is page-faulted in again for the next chunk (measured: 2-3x slower per token),
# so CPU blocks stay at 64 x 50257 x 4 B = 13 MB; GPU caching allocators have no such cost.
HEAD_CHUNK = {"cpu": 64}
HEAD_CHUNK_DEFAULT = 2048
FAST_MODEL_TYPES = (
    "gpt2",
    "gpt2_repro",
)  # backbone returns post-LayerNorm states, head is a plain nn.Linear


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class EvaluateArgs:
    """Command line of evaluate_gpt2.py (each field is an option)."""

    model: str = opt(help="checkpoint folder or Hub id (e.g. gpt2) of a causal LM")
    data_dir: str | None = opt(
        None, "folder (or glob) of data_prep.py shards; without it or --dataset, no validation loss"
    )
    dataset: str | None = opt(
        None,
        "or validate on the first tokens of this text stream: Hub id or local parquet/jsonl/txt",
    )
    dataset_name: str | None = opt(None, "--dataset's config (sample-10BT for FineWeb-Edu)")
    dataset_split: str = opt("train", "--dataset's split")
    text_column: str = opt("text", "--dataset's column holding the documents")
    val_tokens: int = opt(
        BUILD_NANOGPT_VAL_TOKENS, "validation token budget (build-nanogpt: 10,485,760)"
    )
    seq_len: int | None = opt(
        None, "tokens per validation sequence; unset: min(1024, the model's context)"
    )
    val_batch_size: int = opt(8, "validation sequences per forward pass")
    hellaswag_file: str | None = opt(
        None, "local hellaswag_val.jsonl; unset: download once and cache"
    )
    limit: int | None = opt(None, "score only the first N HellaSwag examples")
    batch_size: int = opt(32, "HellaSwag examples per forward pass (4 rows each)")
    compare: str | None = opt(
        None, "also evaluate this model (e.g. gpt2) and print a side-by-side table"
    )
    output: str | None = opt(
        None, "results JSON; unset: <model folder>/eval_results.json (./ for Hub ids)"
    )
    log_dir: str | None = opt(
        None, "training run folder (or its metrics.jsonl) to plot; unset: found near the model"
    )
    plot: str | None = opt(
        None, "PNG of the training curves; unset: the results JSON path with .png"
    )
    model_card: bool = opt(True, "write the results into README.md of a local model folder")
    device: Literal["auto", "cpu", "cuda"] = opt(
        "auto", "auto: a GPU per process when there is one"
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = opt(
        "float32", "weights' dtype (auto: checkpoint's)"
    )
    trust_remote_code: bool = opt(
        False, "load the model's own code from its folder/repo (auto_map)"
    )
    vocab_file: str | None = opt(None, "GPT-2 vocabulary r50k_base.tiktoken for offline machines")
    compile: bool = opt(False, "torch.compile the model's body (dynamic shapes); worth it on a GPU")

    def validate(self) -> None:
        if self.data_dir is not None and self.dataset is not None:
            raise ConfigError(
                "Validate on shards (--data_dir) or on a stream (--dataset), not both."
            )
        for name in ("val_tokens", "val_batch_size", "batch_size", "seq_len", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {value}.")


def parse_args(argv: list[str] | None = None) -> EvaluateArgs:
    return cli.parse(EvaluateArgs, argv, __doc__.split("\n\n")[0])


# --------------------------------------------------------------------------------------------- HellaSwag data
class HellaSwagUnavailable(RuntimeError):
    """The HellaSwag validation file could not be found or downloaded."""


class EvaluationInputError(ValueError):
    """A model, data file or setting this evaluation cannot use; the message names it and the fix."""


def _cache_dir() -> Path:
    root = (
        os.environ.get(CACHE_ENV)
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2_repro"
    )
    return Path(root) / "hellaswag"


def download_hellaswag(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached hellaswag_val.jsonl; downloads it first (rowanz/hellaswag, else the Hub parquet) if missing."""
    dest = Path(cache_dir) if cache_dir else _cache_dir()
    dest = dest / "hellaswag_val.jsonl"
    if dest.is_file():
        return dest
    errors = []
    url = os.environ.get(URL_ENV, HELLASWAG_URL)
    try:
        import urllib.request

        with urllib.request.urlopen(url, timeout=30) as response:
            write_atomic(dest, response.read())
        return dest
    except OSError as e:  # URLError, timeouts and HTTP errors are OSErrors
        errors.append(f"{url}: {e}")
    try:
        if not hub_reachable():
            raise ConnectionError(
                "offline (HF_HUB_OFFLINE set, or the Hub's host does not resolve)"
            )
        import datasets

        ds = datasets.load_dataset(
            HELLASWAG_HUB_ID, split="validation", revision="refs/convert/parquet"
        )
        lines = (
            json.dumps({"ctx": r["ctx"], "endings": r["endings"], "label": int(r["label"])})
            for r in ds
        )
        write_atomic(dest, "\n".join(lines) + "\n")
        return dest
    except (
        Exception
    ) as e:  # offline, Hub refusal, no parquet conversion: all mean "not available here"
        errors.append(f"Hub dataset {HELLASWAG_HUB_ID}: {type(e).__name__}: {e}")
    raise HellaSwagUnavailable(
        "Could not download the HellaSwag validation set ("
        + "; ".join(errors)
        + "). Offline? Copy "
        f"hellaswag_val.jsonl (from {HELLASWAG_URL}) to this machine and pass --hellaswag_file PATH, or put it at "
        f"{dest}."
    )


def _parse_example(line: str, where: str) -> dict:
    """One JSON line -> {"ctx": str, "endings": [4 str], "label": int}, or a ValueError naming the line."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvaluationInputError(
            f"{where}: not valid JSON ({e.msg}). Each line must be one JSON object."
        ) from None
    if not isinstance(raw, dict):
        raise EvaluationInputError(
            f"{where}: expected a JSON object with ctx, endings and label, got {type(raw).__name__}."
        )
    missing = [k for k in ("ctx", "endings", "label") if k not in raw]
    if missing:
        raise EvaluationInputError(
            f"{where}: missing field(s) {missing}; each example needs ctx (str), endings (4 str) and label (0-3). "
            "Use the validation file hellaswag_val.jsonl (the test split has no labels)."
        )
    ctx, endings, label = raw["ctx"], raw["endings"], raw["label"]
    if not isinstance(ctx, str) or not ctx:
        raise EvaluationInputError(f"{where}: ctx must be a non-empty string, got {ctx!r}.")
    if not (
        isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)
    ):
        raise EvaluationInputError(
            f"{where}: endings must be a list of 4 strings, got {endings!r}."
        )
    if isinstance(label, str) and label.strip().isdigit():  # the Hub copy stores "0".."3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
        raise EvaluationInputError(
            f"{where}: label must be the index 0-3 of the right ending, got {label!r}."
        )
    return {"ctx": ctx, "endings": endings, "label": label}


def load_hellaswag(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """HellaSwag validation examples [{"ctx", "endings", "label"}] from a jsonl file (None: download and cache).

    Raises HellaSwagUnavailable when there is no file and no network, ValueError on a malformed line.
    """
    if limit is not None and limit < 1:
        raise EvaluationInputError(f"limit must be a positive number of examples, got {limit}.")
    if path is None:
        path = download_hellaswag()
    path = Path(path)
    if not path.is_file():
        raise HellaSwagUnavailable(
            f"HellaSwag file not found: {path}. Pass the path of hellaswag_val.jsonl."
        )
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                examples.append(_parse_example(line, f"{path}:{lineno}"))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise EvaluationInputError(f"{path} holds no examples: expected one JSON object per line.")
    return examples


def render_example(
    encoding, example: dict, max_len: int | None = None
) -> tuple[list[int], list[list[int]]]:
    """GPT-2 tokens of the context and of each " " + ending (build-nanogpt's rendering).

    A row is context + ending, and the model reads all of it but its last token, so it must fit
    len(ctx) + len(ending) - 1 <= max_len: longer contexts lose their oldest tokens (never the endings).
    """
    ctx = encoding.encode_ordinary(example["ctx"])
    endings = [encoding.encode_ordinary(" " + e) for e in example["endings"]]
    if max_len is not None:
        longest = max(len(e) for e in endings)
        if longest > max_len:
            raise EvaluationInputError(
                f"An ending of {longest} tokens does not fit the model's context of {max_len} tokens."
            )
        ctx = ctx[max(0, len(ctx) + longest - 1 - max_len) :]
    return ctx, endings


# ------------------------------------------------------------------------------------------ model plumbing
def _model_to_run(model, accelerator=None):
    """(module, fast): the plain transformers model inside DDP / torch.compile wrappers, and whether its backbone
    and LM head can be called separately (then only the scored positions go through the head)."""
    from accelerate.utils import DistributedType, extract_model_from_parallel

    if accelerator is not None:
        zero3 = getattr(getattr(accelerator.state, "deepspeed_plugin", None), "zero_stage", 0) == 3
        if accelerator.distributed_type == DistributedType.FSDP or zero3:
            raise NotImplementedError(
                "validation_loss/score_hellaswag need every process to hold the whole model (one process or DDP); "
                "with FSDP or ZeRO-3, save a checkpoint and run evaluate_gpt2.py on it."
            )
    net = extract_model_from_parallel(
        model, keep_torch_compile=False
    )  # eager: no recompiles per batch shape
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    fast = getattr(net.config, "model_type", None) in FAST_MODEL_TYPES and isinstance(
        head, torch.nn.Linear
    )
    return net, fast


def check_vocab(net, n_vocab: int = GPT2_VOCAB_SIZE) -> None:
    """The model (unwrapped) must have a logit for every id of the GPT-2 tokenizer."""
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else net.config.vocab_size
    if vocab < n_vocab:
        raise EvaluationInputError(
            f"The model's vocabulary has {vocab} ids but the GPT-2 tokenizer has {n_vocab}: its logits cannot "
            "score GPT-2 tokens. Evaluate a model trained with GPT-2's BPE (vocab_size 50257, or padded to 50304)."
        )


def context_length(net) -> int | None:
    """Longest input the model takes (n_positions / max_position_embeddings), None if it does not say."""
    return getattr(net.config, "n_positions", None) or getattr(
        net.config, "max_position_embeddings", None
    )


@contextlib.contextmanager
def _evaluating(model, accelerator=None):
    """Eval mode, no grads, the trainer's autocast; the train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        model.train(was_training)


def _token_losses(
    net, fast, input_ids, targets, rows=None, cols=None, n_vocab=GPT2_VOCAB_SIZE
) -> torch.Tensor:
    """Cross-entropy (fp32, nats) of each target given the tokens before it. (P,)

    input_ids (R, T). With rows/cols (P,): target p is predicted at input_ids[rows[p], cols[p]]; without them every
    position is scored and targets is (R, T). -100 targets give 0. Logits are cut to the first n_vocab ids.
    """
    R, T = input_ids.shape
    if fast:  # backbone once, LM head only on the scored positions, in chunks (no (R, T, V) logits tensor)
        hidden = net.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (R, T, C)
        h = hidden.reshape(R * T, -1) if rows is None else hidden[rows, cols]  # (P, C)
        head = net.get_output_embeddings()
        weight, bias = head.weight[:n_vocab], None if head.bias is None else head.bias[:n_vocab]
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


def _batch_rows(rendered: list, pad_id: int):
    """Rows of one forward pass: every ending after its context, right-padded.

    Returns input_ids (R, T), and for each scored token its row, its position (which predicts it) and its id.
    Padding sits after every scored position, so causal attention never lets it change a scored logit.
    """
    seqs = [ctx + end for ctx, ends in rendered for end in ends]
    starts = [
        len(ctx) - 1 for ctx, ends in rendered for _ in ends
    ]  # position predicting the ending's 1st token
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
    model,
    encoding,
    examples: list[dict],
    batch_size: int = 32,
    accelerator=None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of each ending's tokens, for every example, gathered from all processes.

    Returns (losses (N, 4) float64 nats, lengths (N, 4) int64 tokens, labels (N,) int64), in the order of
    `examples`. Process k scores examples k, k + P, k + 2P, ...; uneven splits are exact (padding rows dropped).
    Examples are sorted by length before batching, so little padding is computed.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    net, fast = _model_to_run(model, accelerator)
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
            input_ids, rows, cols, targets = (
                t.to(device) for t in _batch_rows([rendered[i] for i in ids], PAD_ID)
            )
            nll = _token_losses(net, fast, input_ids, targets, rows, cols, n_vocab=encoding.n_vocab)
            row_loss = torch.zeros(len(ids) * 4, device=device).index_add_(
                0, rows, nll
            )  # fp32, as build-nanogpt
            local[b : b + len(ids), 0] = torch.tensor(ids, dtype=torch.float64)
            local[b : b + len(ids), 1] = torch.tensor(
                [examples[i]["label"] for i in ids], dtype=torch.float64
            )
            local[b : b + len(ids), 2:6] = row_loss.view(-1, 4).cpu().double()
            local[b : b + len(ids), 6:10] = torch.tensor(
                [[len(e) for e in rendered[i][1]] for i in ids]
            ).double()
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
    model,
    encoding,
    examples: list[dict],
    batch_size: int = 32,
    accelerator=None,
    progress: bool = False,
) -> dict:
    """HellaSwag accuracy: {"acc", "acc_norm", "n"} (the same on every process)."""
    losses, lengths, labels = hellaswag_losses(
        model, encoding, examples, batch_size, accelerator, progress
    )
    return hellaswag_metric().compute(
        ending_losses=losses.tolist(), ending_lengths=lengths.tolist(), references=labels.tolist()
    )


# ---------------------------------------------------------------------------------------------- validation
def validation_loss(
    model, data, val_tokens: int, batch_size: int, seq_len: int, accelerator=None
) -> float:
    """Mean cross-entropy per token over the first `val_tokens` validation tokens.

    `data`: a folder (or glob) of data_prep.py shards, or the first tokens of the validation set as an array (a
    stream's: `stream_validation_tokens`, `StreamingTokenLoader.validation_tokens`). Token-weighted (sum of
    losses / number of tokens, summed over processes with accelerator.reduce), so the figure is the same
    whatever the process count and batch size.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    net, fast = _model_to_run(model, accelerator)
    check_vocab(net)
    device = accelerator.device if accelerator else next(net.parameters()).device
    if (max_len := context_length(net)) is not None and seq_len > max_len:
        raise EvaluationInputError(
            f"seq_len={seq_len} is longer than the model's context ({max_len}): pass seq_len<={max_len}."
        )
    loss_sum, n_tokens = (
        0.0,
        0,
    )  # nats and scored tokens; each batch's fp32 sum is accumulated in float64 here
    with _evaluating(model, accelerator):
        for x, y in iter_val_batches(
            data, batch_size, seq_len, val_tokens, rank=rank, world_size=world
        ):
            x, y = x.to(device), y.to(device)
            loss_sum += _token_losses(net, fast, x, y, n_vocab=GPT2_VOCAB_SIZE).sum().item()
            n_tokens += int((y != -100).sum())
    totals = torch.tensor(
        [loss_sum, n_tokens], dtype=torch.float64
    )  # on the host: MPS has no float64
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals.to(device), reduction="sum").cpu()
    if totals[1] == 0:
        raise EvaluationInputError(
            "No validation tokens were read: the validation data is empty or shorter than one window "
            f"of seq_len={seq_len} + 1 tokens."
        )
    return (totals[0] / totals[1]).item()


# ------------------------------------------------------------------------------------------------ whole models
def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Any causal LM through AutoModelForCausalLM: our checkpoints, their GPT2LMHeadModel export, Hub ids (gpt2)."""
    try:
        import modeling_gpt2_repro  # noqa: F401  (registers model_type "gpt2_repro" with the Auto classes)
    except ModuleNotFoundError as e:  # evaluate_gpt2.py copied elsewhere: remote code still works
        if e.name != "modeling_gpt2_repro":
            raise
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            local_files_only=Path(name_or_path).is_dir()
            or not hub_reachable(),  # offline: no ~25 s of retries
        )
    except OSError as e:
        raise EvaluationInputError(
            f"Could not load a causal LM from {name_or_path!r}: {' '.join(str(e).split())} Pass a checkpoint "
            "folder (config.json + model.safetensors) or a Hub id; offline, the Hub id must already be in the "
            "Hugging Face cache."
        ) from e
    broken = nonfinite_parameters(model)
    if broken:
        raise EvaluationInputError(
            f"{name_or_path}: {len(broken)} weight tensor(s) hold NaN or inf (e.g. {broken[0]}): the training run "
            "diverged before this was saved. Evaluate an earlier checkpoint."
        )
    return model.eval()


def compile_body(model):
    """torch.compile the model's transformer body in place; the LM head stays eager.

    Dynamic shapes, so HellaSwag's batches of every length share one compiled graph instead of one each; the
    head runs only on the scored positions anyway (see _token_losses). Returns the model.
    """
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if not isinstance(body, torch.nn.Module):
        raise ConfigError(f"--compile: {type(model).__name__} has no transformer body to compile")
    setattr(model, prefix, torch.compile(body, dynamic=True))
    return model


def stream_validation_tokens(args: EvaluateArgs, encoding) -> np.ndarray:
    """The first tokens of --dataset that the validation budget needs (a streamed training run's val set)."""
    from text_stream import open_text_stream, read_stream_head

    need = args.val_tokens // args.seq_len * args.seq_len + 1
    src = open_text_stream(args.dataset, args.dataset_name, args.dataset_split, args.text_column)
    return read_stream_head(src.dataset, args.text_column, encoding, need)[0]


def evaluate_model(
    model,
    encoding,
    args: EvaluateArgs,
    examples: list[dict] | None,
    accelerator=None,
    val_data=None,
) -> dict:
    """Both measurements for one loaded model, each when its data is there (None otherwise).

    val_data: what `validation_loss` reads (default: --data_dir)."""
    out = {
        "val_loss": None,
        "val_tokens": None,
        "seq_len": None,
        "hellaswag_acc": None,
        "hellaswag_acc_norm": None,
    }
    out["hellaswag_examples"] = 0
    val_data = args.data_dir if val_data is None else val_data
    if val_data is not None:
        start = time.perf_counter()
        out["val_loss"] = validation_loss(
            model, val_data, args.val_tokens, args.val_batch_size, args.seq_len, accelerator
        )
        scored = (
            args.val_tokens // args.seq_len * args.seq_len
        )  # whole windows only (data_prep.iter_val_batches)
        out.update(val_tokens=scored, seq_len=args.seq_len, val_seconds=time.perf_counter() - start)
    if examples:
        start = time.perf_counter()
        r = score_hellaswag(model, encoding, examples, args.batch_size, accelerator, progress=True)
        out.update(
            hellaswag_acc=r["acc"], hellaswag_acc_norm=r["acc_norm"], hellaswag_examples=r["n"]
        )
        out["hellaswag_seconds"] = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------------------------------- reports
def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_table(results: dict) -> str:
    """Markdown table: this model, the compared model (evaluated here or its published figures), GPT-2, GPT-3."""
    rows = [(f"this model (`{results['model']}`)", results)]
    cmp = results.get("compare")
    if cmp is not None and cmp["evaluated"]:  # otherwise the published rows below stand in for it
        rows.append((f"`{cmp['model']}`, evaluated here on the same data", cmp))
    rows.append(
        ("OpenAI GPT-2 124M, published", {**GPT2_124M, "hellaswag_examples": HELLASWAG_VAL_SIZE})
    )
    rows.append(
        ("OpenAI GPT-3 124M, published", {**GPT3_124M, "hellaswag_examples": HELLASWAG_VAL_SIZE})
    )
    lines = [
        "| model | val loss | HellaSwag acc_norm | HellaSwag acc | HellaSwag examples |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        n = r.get("hellaswag_examples") or "-"
        lines.append(
            f"| {name} | {_fmt(r.get('val_loss'))} | {_fmt(r.get('hellaswag_acc_norm'))} | "
            f"{_fmt(r.get('hellaswag_acc'))} | {n} |"
        )
    return "\n".join(lines)


def comparison_notes(results: dict) -> list[str]:
    notes = []
    if results["val_loss"] is not None:
        notes.append(
            f"Validation loss over {results['val_tokens']:,} tokens in sequences of {results['seq_len']}. "
            f"The published GPT-2 figure is on the FineWeb-Edu sample-10BT val shard "
            f"({BUILD_NANOGPT_VAL_TOKENS:,} tokens of 1024): "
            "comparable only on that data."
        )
    n = results["hellaswag_examples"]
    if 0 < n < HELLASWAG_VAL_SIZE:
        notes.append(
            f"HellaSwag on {n} of the {HELLASWAG_VAL_SIZE:,} validation examples; published figures use all."
        )
    cmp = results.get("compare")
    if cmp is not None and not cmp["evaluated"]:
        notes.append(
            f"`{cmp['model']}` could not be loaded here ({cmp['reason']}): compare with the published rows."
        )
    return notes


def evaluation_section(results: dict) -> str:
    """The model card's "Evaluation results" section (markdown): the comparison table and its notes."""
    notes = "".join(f"\n- {n}" for n in comparison_notes(results))
    return (
        f"## Evaluation results\n\nMeasured with `python evaluate_gpt2.py` (gpt2-repro) on {results['date']}.\n\n"
        f"{comparison_table(results)}\n{notes}"
    )


def write_results_to_card(
    folder: str | os.PathLike, results: dict, data_dir: str | None = None
) -> Path:
    """The evaluation section into folder/README.md, and into its model-index: the validation loss (on the data
    that `data_dir`'s manifest names) and HellaSwag when all of it was scored."""
    complete = results["hellaswag_examples"] == HELLASWAG_VAL_SIZE
    hellaswag = {m: results[f"hellaswag_{m}"] for m in ("acc_norm", "acc")} if complete else None
    val_loss = None
    if results["val_loss"] is not None:
        val_loss = {"value": results["val_loss"], "tokens": results["val_tokens"]}
        val_loss["data_source"] = manifest_source(data_dir)
    # The card is meant to be shared: local model folders by their name only, never a path of this machine.
    public = {**results, "model": _card_name(results["model"])}
    if results.get("compare"):
        public["compare"] = {**results["compare"], "model": _card_name(results["compare"]["model"])}
    return update_model_card(folder, evaluation_section(public), hellaswag, val_loss)


def _card_name(name: str) -> str:
    """A Hub id as it is; a local folder by its last component (`export`, `step_00001000`)."""
    return Path(name).name if Path(name).exists() else name


def find_metrics_log(log_dir: str | None, model: str) -> Path | None:
    """metrics.jsonl of the training run: --log_dir (folder or file), else in the model folder or 2 levels up."""
    if log_dir:
        candidates = [Path(log_dir)]
    elif Path(model).is_dir():
        folder = Path(model).resolve()
        candidates = [folder, *list(folder.parents)[:2]]
    else:
        return None
    for c in candidates:
        f = c if c.is_file() else c / "metrics.jsonl"
        if f.is_file():
            return f
    return None


def read_eval_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """{"val_loss": [(step, value)], "hellaswag_acc_norm": [...]} from the eval lines of a training log.

    Lines that are not JSON objects (a run still writing its last line) are skipped.
    """
    curves = {"val_loss": [], "hellaswag_acc_norm": []}
    for line in Path(metrics_file).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for key, points in curves.items():
            if isinstance(record.get(key), (int, float)) and math.isfinite(record[key]):
                points.append((record["step"], float(record[key])))
    return curves


def plot_training_curves(metrics_file: Path, png: str | os.PathLike, results: dict) -> Path | None:
    """Validation loss and HellaSwag over training steps, with OpenAI's GPT-2 (and GPT-3) 124M as lines."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    curves = read_eval_curves(metrics_file)
    if not any(curves.values()):
        logger.warning(
            "No eval lines (step + val_loss / hellaswag_acc_norm) in %s: no plot.", metrics_file
        )
        return None
    cmp = results.get("compare") or {}
    measured = cmp.get("evaluated", False)

    def baseline(
        key,
    ):  # the compared model evaluated here on the same data, else the published figure
        if measured and cmp.get(key) is not None:
            return cmp[key], f"{cmp['model']} (evaluated here)"
        return GPT2_124M[key], "OpenAI GPT-2 124M (published)"

    fig = Figure(figsize=(12, 4.5))
    ax_loss, ax_hs = fig.subplots(1, 2)
    panels = [
        (ax_loss, "val_loss", "validation loss"),
        (ax_hs, "hellaswag_acc_norm", "HellaSwag acc_norm"),
    ]
    for ax, key, label in panels:
        if curves[key]:
            steps, values = zip(*curves[key], strict=True)
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label="this run")
        value, name = baseline(key)
        ax.axhline(value, color="tab:red", linestyle="--", label=f"{name}: {value:.4f}")
        ax.set(xlabel="step", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    ax_hs.axhline(
        GPT3_124M["hellaswag_acc_norm"],
        color="tab:green",
        linestyle="--",
        label="OpenAI GPT-3 124M: 0.337",
    )
    for ax in (ax_loss, ax_hs):
        ax.legend()
    fig.suptitle(f"{results['model']}: evaluations during training ({Path(metrics_file).name})")
    fig.tight_layout()
    png = Path(png)
    with atomic_write(png) as f:
        fig.savefig(f, format="png", dpi=100)
    return png


# ------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from accelerate import Accelerator

    from gpt2_tokenizer import get_gpt2_encoding

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: no CUDA device is visible here. Use --device cpu (or auto)."
        )
    accelerator = Accelerator(cpu=args.device == "cpu")
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.ERROR, format="%(message)s"
    )
    encoding = get_gpt2_encoding(args.vocab_file)
    model = load_model(args.model, args.dtype, args.trust_remote_code).to(accelerator.device)
    check_vocab(model, encoding.n_vocab)
    if args.compile:
        compile_body(model)

    examples, error = None, None
    with (
        accelerator.main_process_first()
    ):  # the main process downloads, the others then read the cache
        try:
            examples = load_hellaswag(args.hellaswag_file, args.limit)
        except HellaSwagUnavailable as e:
            logger.warning("HellaSwag skipped: %s", e)
        except Exception as e:  # raised after the barrier, so no process waits forever
            error = e
    if error is not None:
        raise error
    if args.data_dir is None and args.dataset is None:
        logger.warning(
            "No --data_dir: validation loss skipped (pass the folder of data_prep.py shards, or a "
            "--dataset to validate on its first tokens)."
        )
    elif args.seq_len is None:
        args.seq_len = min(1024, context_length(model) or 1024)
    val_data = stream_validation_tokens(args, encoding) if args.dataset else None

    results = {"model": args.model, "processes": accelerator.num_processes}
    results.update(
        evaluate_model(model, encoding, args, examples, accelerator, val_data), compare=None
    )
    if args.compare:
        try:
            other = load_model(args.compare, args.dtype, args.trust_remote_code).to(
                accelerator.device
            )
            other = compile_body(other) if args.compile else other
        except (OSError, ValueError) as e:
            logger.warning(
                "Could not load %s to compare (%s); using its published figures.", args.compare, e
            )
            results["compare"] = {
                "model": args.compare,
                "evaluated": False,
                "reason": str(e).splitlines()[0],
            }
            results["compare"].update({**GPT2_124M, "hellaswag_examples": HELLASWAG_VAL_SIZE})
        else:
            del model  # one model in memory at a time
            results["compare"] = {"model": args.compare, "evaluated": True}
            results["compare"].update(
                evaluate_model(other, encoding, args, examples, accelerator, val_data)
            )
    results.update(
        published={"gpt2_124m": GPT2_124M, "gpt3_124m": GPT3_124M},
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        notes=comparison_notes(results),
    )
    if accelerator.is_main_process:
        _report(args, results)
    accelerator.wait_for_everyone()
    return results


def _report(args: EvaluateArgs, results: dict) -> None:
    """Print the table; write the JSON, the model card section and the plot (main process only)."""
    is_folder = Path(args.model).is_dir()
    output = Path(
        args.output
        or (Path(args.model) / "eval_results.json" if is_folder else "eval_results.json")
    )
    metrics_file = (
        find_metrics_log(args.log_dir, args.model) if (args.compare or args.log_dir) else None
    )
    if args.log_dir and metrics_file is None:
        logger.warning("No metrics.jsonl at %s: no training-curve plot.", args.log_dir)
    results["plot"] = None
    if metrics_file is not None:
        png = plot_training_curves(metrics_file, args.plot or output.with_suffix(".png"), results)
        results["plot"] = None if png is None else str(png)
    write_json_atomic(output, results)  # strict JSON: a NaN loss is written as null
    print("\n" + comparison_table(results))
    for note in results["notes"]:
        print(f"- {note}")
    print(f"\nresults: {output}" + (f"\nplot: {results['plot']}" if results["plot"] else ""))
    if is_folder and args.model_card:
        print(f"model card: {write_results_to_card(args.model, results, args.data_dir)}")


if __name__ == "__main__":
    cli.run(main, errors=(EvaluationInputError, HellaSwagUnavailable, DataError, FileNotFoundError))
