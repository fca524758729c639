"""Models to evaluate: loading any causal LM (ours, its stock export, Hub ids), what it can be asked (vocabulary,
context length), whether its weights are finite, and compiling its body for evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from ..base.errors import ConfigError, EvaluationInputError
from ..base.machine import hub_reachable
from ..data.tokenizer import GPT2_VOCAB_SIZE


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
    return getattr(net.config, "n_positions", None) or getattr(net.config, "max_position_embeddings", None)


def is_fully_sharded(model) -> bool:
    """Whether FSDP2 shards `model` (torch's fully_shard, which accelerate's FSDP with fsdp_version 2 applies in
    place): each process holds a shard of every parameter, and a forward, run by every process together, gathers
    them."""
    if not torch.distributed.is_available():  # builds without torch.distributed have no FSDP
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model) -> None:
    """Return the parameters of a model FSDP2 shards to their shards after forwards without a backward (evaluation,
    generation).

    The groups that do not reshard after their forward (the root's, and accelerate's embeddings + final LayerNorm +
    tied head: by design, for the backward that follows in training) would otherwise stay gathered until the next
    training step: memory held for nothing, and `parameters()` would list the gathered copies instead of the shards
    the optimizer updates. A no-op for any other model.
    """
    if not is_fully_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters holding NaN or inf, on this process (one device sync for all of them).

    Under FSDP each process checks its own shards (DTensor local parts): reduce the count across processes. The
    norm of each tensor first (NaN and inf carry through it; 0.1 s for GPT-2 124M on a CPU core, against 3 s for an
    element-wise test of every weight); the tensors are tested one by one only to name the bad ones (or when a
    norm of finite weights overflows).
    """
    import torch

    named = [(n, p.detach()) for n, p in model.named_parameters()]
    if not named:
        return []
    local = [p.to_local() if hasattr(p, "to_local") else p for _, p in named]
    if (
        torch.stack([torch.linalg.vector_norm(p.float() if p.dtype == torch.float16 else p) for p in local])
        .isfinite()
        .all()
    ):
        return []
    finite = torch.stack([torch.isfinite(p).all() for p in local]).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Any causal LM through AutoModelForCausalLM: our checkpoints, their GPT2LMHeadModel export, Hub ids (gpt2)."""
    from gpt2_repro import register_auto_classes

    try:
        register_auto_classes()  # model_type "gpt2_repro" -> the project's classes, in this process
    except ModuleNotFoundError as e:  # evaluate_gpt2.py copied elsewhere: remote code still works
        if e.name != "modeling_gpt2_repro":
            raise
    from pickle import UnpicklingError

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            local_files_only=Path(name_or_path).is_dir() or not hub_reachable(),  # offline: no ~25 s of retries
            output_loading_info=True,
        )
    except UnpicklingError as e:  # torch.load(weights_only=True) refused a pickle: nothing in it was run
        raise EvaluationInputError(
            f"{name_or_path}: its weights file is not plain tensors: torch.load(weights_only=True) refused it "
            f"({str(e).split('.')[0]}), so nothing in it was run. A pickle can run any code when loaded: "
            "evaluate a model saved as model.safetensors, or one whose origin you trust."
        ) from None
    except OSError as e:
        raise EvaluationInputError(
            f"Could not load a causal LM from {name_or_path!r}: {' '.join(str(e).split())} Pass a checkpoint "
            "folder (config.json + model.safetensors) or a Hub id; offline, the Hub id must already be in the "
            "Hugging Face cache."
        ) from e
    except SafetensorError as e:  # a truncated or damaged model.safetensors
        raise EvaluationInputError(
            f"{name_or_path}: its weights cannot be read ({e}): the file is truncated or damaged. Copy the folder "
            "again, or evaluate another checkpoint."
        ) from e
    wrong = [
        f"{len(keys)} {what} (e.g. {', '.join(sorted(map(str, keys))[:2])})"
        for what, keys in [
            ("weights the model has and the file lacks, left at random", loading.get("missing_keys")),
            ("weights in the file that the model has no place for, left out", loading.get("unexpected_keys")),
            ("weights of another shape", loading.get("mismatched_keys")),
        ]
        if keys
    ]
    if wrong:  # transformers loads the rest and reports it; figures of such a model would describe nothing
        raise EvaluationInputError(
            f"{name_or_path}: its weights do not fit its config.json: {'; '.join(wrong)}. The config was "
            "edited, or the weights belong to another model: evaluate the folder as it was saved."
        )
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
