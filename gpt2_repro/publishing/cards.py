"""Model cards: the README.md of every export (Hub metadata, training, evaluation, usage).

`write_model_card(folder, ...)` writes the card of an export; `update_model_card(folder, ...)` adds or replaces the
section that evaluate_gpt2.py measures. Cards name no local path (a local dataset by its file name only), list a
Hub dataset in their metadata, and carry the known results (validation loss, HellaSwag) as `model-index` entries.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..base.atomic_io import write_atomic
from ..base.published import (
    BUILD_NANOGPT_VAL_TOKENS,
    DEFAULT_DATASET_CONFIGS,
    FINEWEB_EDU,
    GPT2_124M,
    HELLASWAG_HUB_ID,
    HELLASWAG_VAL_SIZE,
)
from .hub import STOCK_GPT2_BRANCH


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def describe_dataset(source: dict | None) -> tuple[str, str | None]:
    """(markdown naming the data without local paths, Hub dataset id or None) for a data source.

    `source` is what data_prep.py's manifest.json records (text_stream's identity): a Hub dataset {"dataset",
    "name", "split"}, or local files {"dataset", "data_files", ...}, which are named by their file name only.
    """
    if not source or not source.get("dataset"):
        return "GPT-2 token shards prepared locally", None
    dataset = str(source["dataset"])
    if source.get("data_files") is None and re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        details = [f"config `{source['name']}`"] if source.get("name") else []
        details += [f"split `{source['split']}`"] if source.get("split") else []
        more = f" ({', '.join(details)})" if details else ""
        return f"[{dataset}](https://huggingface.co/datasets/{dataset}){more}", dataset
    return f"local text (`{Path(dataset.rstrip('/')).name}`)", None


def dataset_short_name(source: dict | None) -> str:
    """The data in a few words, for a title: a Hub dataset's name (and config), a local corpus's file or folder
    name without its suffix; never a path."""
    if not source or not source.get("dataset"):
        return "locally prepared token shards"
    dataset = str(source["dataset"]).rstrip("/")
    if source.get("data_files") is None and re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        return dataset.split("/")[-1] + (f" ({source['name']})" if source.get("name") else "")
    return Path(dataset).stem


def is_gpt2_val_data(source: dict | None) -> bool:
    """Whether `source` is the data of OpenAI GPT-2 124M's published validation loss (FineWeb-Edu sample-10BT, what
    data_prep.py prepares by default): the only data that figure can be compared with."""
    if not source or source.get("dataset") != FINEWEB_EDU or source.get("data_files") is not None:
        return False
    return (source.get("name") or DEFAULT_DATASET_CONFIGS[FINEWEB_EDU]) == DEFAULT_DATASET_CONFIGS[FINEWEB_EDU]


def published_val_loss(source: dict | None) -> str:
    """OpenAI GPT-2 124M's published validation loss as a table cell: the figure where `source` is its data, else
    why there is none to compare with."""
    if is_gpt2_val_data(source):
        return f"{GPT2_124M['val_loss']} ({BUILD_NANOGPT_VAL_TOKENS:,} tokens of the val shard, windows of 1,024)"
    return f"- (its {GPT2_124M['val_loss']} is on FineWeb-Edu sample-10BT: other text)"


def eval_results(
    *,
    val_loss: float | None = None,
    val_tokens: int | None = None,
    data_source: dict | None = None,
    hellaswag: dict | None = None,
    hellaswag_examples: int | None = None,
) -> list[EvalResult]:
    """`model-index` entries: validation loss on the held-out tokens of the training data, HellaSwag accuracies.

    The Hub reads an entry's dataset type as a Hub dataset id: the validation loss gets an entry only when the data
    is a Hub dataset (a local corpus is described in the card's text instead). hellaswag: {"acc_norm": ...,
    "acc": ...} (either may be missing); scored on fewer than all 10,042 examples, the entry says so in its split
    ("validation[:N]"), so it is never mistaken for the published protocol.
    """
    results = []
    name, hub_id = describe_dataset(data_source)
    if val_loss is not None and hub_id is not None:
        held_out = f"first {val_tokens:,} tokens, held out" if val_tokens else "held-out tokens"
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Language modeling",
                dataset_type=hub_id,
                dataset_name=re.sub(r"\[([^]]+)\]\([^)]*\)", r"\1", name).replace("`", ""),
                dataset_config=(data_source or {}).get("name"),
                dataset_split=f"validation ({held_out})",
                metric_type="loss",
                metric_name="validation loss (nats per token)",
                metric_value=round(float(val_loss), 4),
            )
        )
    complete = hellaswag_examples in (None, HELLASWAG_VAL_SIZE)
    for metric, value in (hellaswag or {}).items():
        if value is None:
            continue
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=HELLASWAG_HUB_ID,
                dataset_name="HellaSwag",
                dataset_split="validation" if complete else f"validation[:{hellaswag_examples}]",
                metric_type=metric,
                metric_value=round(float(value), 4),
            )
        )
    return results


def _merge_results(old: list[EvalResult] | None, new: list[EvalResult]) -> list[EvalResult]:
    """`old` with the entries measuring the same thing (dataset and metric) as one in `new` replaced."""
    key = lambda r: (r.dataset_type, r.metric_type)
    replaced = {key(r) for r in new}
    return [r for r in old or [] if key(r) not in replaced] + new


def load_snippet(repo_id: str | None, revision: str | None = None, stock_gpt2: bool = False) -> str:
    """The `from_pretrained` lines of a card: the Hub repo (and branch) when known, never a local path.

    The tokenizer line passes trust_remote_code=True as the model line does: AutoTokenizer (transformers 5) always
    reads the folder's config.json through AutoConfig, whose class is the folder's code, so without it the load asks
    "Do you wish to run the custom code?" (and, answered no or without a terminal, warns about the model type)."""
    where = repo_id or "path/to/this/folder"
    extra = (f', revision="{revision}"' if repo_id and revision else "") + (
        "" if stock_gpt2 else ", trust_remote_code=True"
    )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}"{extra})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}"{extra})\n'
    )


def write_model_card(
    folder: str | Path,
    *,
    step: int,
    tokens: int,
    config: dict,
    val_loss: float | None = None,
    val_step: int | None = None,
    hellaswag_acc_norm: float | None = None,
    hellaswag_examples: int | None = None,
    data_source: dict | None = None,
    repo_id: str | None = None,
    stock_gpt2: bool = False,
) -> Path:
    """README.md in `folder`: Hub metadata (dataset, model-index results) plus a human summary. Returns its path.

    repo_id: the Hub repo the model is pushed to (the stock export lives on its `gpt2` branch); without one the
    card says "path/to/this/folder". data_source: see `describe_dataset`.
    """
    data_text, hub_dataset = describe_dataset(data_source)
    results = eval_results(
        val_loss=val_loss,
        val_tokens=config.get("eval", {}).get("val_tokens"),
        data_source=data_source,
        hellaswag={"acc_norm": hellaswag_acc_norm},
        hellaswag_examples=hellaswag_examples,
    )
    name = repo_id or "gpt2-repro"
    metadata = ModelCardData(
        language="en",
        license="mit",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2", "gpt2-repro", "causal-lm"] + ([] if stock_gpt2 else ["custom_code"]),
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=name.rsplit("/", 1)[-1] if results else None,
        eval_results=results or None,
    )
    revision = STOCK_GPT2_BRANCH if stock_gpt2 else None
    body = (
        _card_intro(config, step, repo_id, stock_gpt2, data_source)
        + _training_section(config, step, tokens, data_text)
        + _evaluation_section(config, val_loss, val_step, hellaswag_acc_norm, hellaswag_examples, data_source)
        + f"""
## Use
```python
{load_snippet(repo_id, revision, stock_gpt2)}
ids = tokenizer("Hello, I'm a language model,", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=32, do_sample=True, top_k=50)[0]))
```
"""
        + _use_and_limitations(config, tokens, data_source)
        + _framework_versions()
    )
    path = Path(folder) / "README.md"
    write_atomic(path, str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}")))
    return path


def model_size(model: dict) -> str:
    """The parameter count of a `model:` section in words: 7M, 124M, 1.6B."""
    from types import SimpleNamespace

    from ..base.config import parameter_count

    n = parameter_count(SimpleNamespace(**model))
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _card_intro(config: dict, step: int, repo_id: str | None, stock_gpt2: bool, data_source: dict | None) -> str:
    """The card's title (the model's size and data) and first paragraph: the model's shape, what this folder holds,
    where the other export is."""
    model, data = config["model"], config["data"]
    fmt = "a stock `GPT2LMHeadModel` (plain transformers)" if stock_gpt2 else "our `GPT2ReproForCausalLM` (remote code)"
    other = (
        f"\nThe same weights as a stock `GPT2LMHeadModel` (no remote code: lm-eval, vLLM, pipelines) are on the "
        f'`{STOCK_GPT2_BRANCH}` branch: `from_pretrained("{repo_id}", revision="{STOCK_GPT2_BRANCH}")`.\n'
        if repo_id and not stock_gpt2
        else ""
    )
    size = model_size(model)
    return f"""
# GPT-2 ({size}) trained from scratch on {dataset_short_name(data_source)}

A GPT-2 language model ({model["n_layer"]} layers, {model["n_head"]} heads, width {model["n_embd"]},
context {data["seq_len"]}, {size} parameters) trained from scratch with the `gpt2-repro` trainer (transformers +
accelerate), here at step {step:,} of {config["optim"]["max_steps"]:,}. This folder holds {fmt} and the GPT-2
tokenizer.
{other}"""


def _training_section(config: dict, step: int, tokens: int, data_text: str) -> str:
    """The card's "Training" section: the data, the steps and tokens, the optimizers and their schedule, and
    activation checkpointing when the run used it."""
    data, optim = config["data"], config["optim"]
    batch = f"{data['total_batch_tokens']:,} per step, in sequences of {data['seq_len']:,}"
    lines = [
        f"- Data: {data_text}, GPT-2 BPE, documents separated by `<|endoftext|>`.",
        f"- Steps: {step:,} of {optim['max_steps']:,}; tokens seen: {tokens:,} ({batch}).",
        *_optimizer_lines(optim),
        *(["- Init: GPT-2's, with the blocks' output projections at zero."] if optim.get("zero_init_proj") else []),
        f"- Schedule: {_schedule_text(optim)}.",
        f"- Gradient clipping at norm {optim['grad_clip']}.",
    ]
    if config.get("run", {}).get("gradient_checkpointing"):  # absent from the configs of older runs
        lines.append(
            "- Activation checkpointing (transformers' own, every block run again in the backward): less memory, "
            "the same numbers."
        )
    return "\n## Training\n" + "\n".join(lines) + "\n"


def _optimizer_lines(optim: dict) -> list[str]:
    """One line per optimizer of the run, with what it trains and its settings."""
    adamw = (
        f"AdamW (betas {optim['beta1']}/{optim['beta2']}, eps {optim['eps']:g}, weight decay {optim['weight_decay']}"
    )
    adamw += f" on matrices and embeddings), peak LR {optim['max_lr']:g}"
    if optim.get("optimizer", "adamw") != "muon":
        return [f"- Optimizer: {adamw}, on every parameter."]
    momentum = f"{optim['muon_momentum']}"
    if warmup := optim.get("muon_momentum_warmup_steps"):  # absent from the configs of older runs
        momentum = f"{optim['muon_momentum_start']} rising to {momentum} over {warmup:,} steps"
    muon = (
        f"Muon (PyTorch's `torch.optim.Muon`: momentum {momentum}"
        f"{', Nesterov' if optim['muon_nesterov'] else ''}, {optim['muon_ns_steps']} Newton-Schulz steps, "
        f"LR adjustment `{optim['muon_adjust_lr_fn']}`, weight decay {optim['muon_weight_decay']}), "
        f"peak LR {optim['muon_lr']:g}"
    )
    return [
        f"- Optimizers: {muon}, on the attention and MLP weight matrices of the blocks;",
        f"  {adamw}, on the rest: the embeddings (the token embedding is also the tied LM head), LayerNorms, biases.",
    ]


def _schedule_text(optim: dict) -> str:
    """The LR schedule in words; every optimizer follows it from its own peak."""
    floor = f"{optim['min_lr'] / optim['max_lr']:.0%} of each peak"
    warmup = f"linear warmup over {optim['warmup_steps']:,} steps"
    if optim.get("schedule", "cosine") == "wsd":
        decay = max(1, round(optim["decay_fraction"] * optim["max_steps"]))
        shape = "1 - sqrt" if optim.get("decay_shape") == "sqrt" else "linear"
        return (
            f"warmup-stable-decay: {warmup}, constant, then a {shape} cool-down over the final {decay:,} steps "
            f"({optim['decay_fraction']:.0%}) to {floor}"
        )
    return f"{warmup}, then cosine to {floor} at step {optim['max_steps']:,}"


def _evaluation_section(
    config: dict, val_loss, val_step, hellaswag_acc_norm, hellaswag_examples, data_source: dict | None
) -> str:
    """The card's "Evaluation during training" section: the run's latest figures, each with what it was measured
    on (how many tokens, which examples), beside OpenAI's GPT-2 124M where the data is the same."""
    scored = config["eval"]["val_tokens"] // config["data"]["seq_len"] * config["data"]["seq_len"]
    where = f"first {scored:,} tokens of the validation split, windows of {config['data']['seq_len']:,}"
    examples = "not scored during training"
    if hellaswag_acc_norm is not None:
        examples = f"{min(hellaswag_examples or HELLASWAG_VAL_SIZE, HELLASWAG_VAL_SIZE):,} of {HELLASWAG_VAL_SIZE:,}"
        examples += " examples"
    when = f" at step {val_step:,}" if val_step is not None else ""
    gpt2_hellaswag = f"{GPT2_124M['hellaswag_acc_norm']} (all {HELLASWAG_VAL_SIZE:,})"
    return f"""
## Evaluation during training

Measured by the trainer{when}.

| metric | this model | OpenAI GPT-2 124M, published |
|---|---|---|
| validation loss ({where}) | {_fmt(val_loss, ".4f")} | {published_val_loss(data_source)} |
| HellaSwag acc_norm ({examples}) | {_fmt(hellaswag_acc_norm, ".4f")} | {gpt2_hellaswag} |

A validation loss is the mean over the tokens it scores: a figure over other tokens (another budget, other windows,
other text) differs from this one. `python evaluate_gpt2.py --model <this folder>`, run where the training run's
folder and data are, scores the same {scored:,} tokens by default and adds "Evaluation results" below, each figure
with its token count.
"""


def _use_and_limitations(config: dict, tokens: int, data_source: dict | None) -> str:
    """The card's "Intended use" and "Limitations" sections: what this model is for, and what to expect of it."""
    data = dataset_short_name(data_source)
    few = (
        f" {tokens:,} tokens is a small fraction of the 10B that GPT-2 124M reproductions train on: expect text that "
        "imitates the surface of its data more than it makes sense."
        if tokens < 1e9
        else ""
    )
    return f"""
## Intended use

Research and teaching: a from-scratch reproduction of GPT-2's pretraining, to study how it trains, to compare with
OpenAI's GPT-2 on the same validation data and HellaSwag, or to start further experiments from. It is a base language
model that continues text; it was not tuned to follow instructions, to chat or to refuse anything.

## Limitations

- {model_size(config["model"])} parameters trained on {tokens:,} tokens of {data}.{few}
- It knows only the language and domains of its training data, and reproduces what that text contains, its errors
  and biases included: it can produce false, offensive or nonsensical text. Do not use it as a source of facts or
  for decisions about people.
- Context of {config["data"]["seq_len"]:,} tokens.
"""


def _framework_versions() -> str:
    """The card's "Framework versions": the libraries that wrote this checkpoint (as Trainer's cards list them)."""
    from ..base.machine import versions

    names = {"torch": "PyTorch", "transformers": "Transformers", "accelerate": "Accelerate", "datasets": "Datasets"}
    names["tiktoken"] = "tiktoken"
    found = versions()
    lines = "".join(f"- {label} {found[lib]}\n" for lib, label in names.items() if found.get(lib))
    return f"\n## Framework versions\n\n{lines}"


CARD_START, CARD_END = ("<!-- gpt2-repro:eval-results:start -->", "<!-- gpt2-repro:eval-results:end -->")


def update_model_card(
    folder: str | os.PathLike, section: str, hellaswag: dict | None = None, val_loss: dict | None = None
) -> Path:
    """Write (or replace) the evaluation `section` (markdown) of folder/README.md, keeping the rest of the card (in
    the trainer's card: after its "Evaluation during training", before "Use").

    `hellaswag` ({"acc_norm", "acc"}, given only when all of HellaSwag was scored) and `val_loss` ({"value",
    "tokens", "data_source"}) also go into the card's model-index metadata (the Hub's evaluation widget),
    replacing the entries of the same measurement (the trainer's, for example).
    """
    path = Path(folder) / "README.md"
    card = ModelCard(path.read_text(encoding="utf-8") if path.is_file() else "")
    section = f"{CARD_START}\n{section}\n{CARD_END}"
    text = card.text
    if CARD_START in text and CARD_END in text:
        text = text[: text.index(CARD_START)] + section + text[text.index(CARD_END) + len(CARD_END) :]
    elif "\n## Use\n" in text:  # our card: next to the trainer's evaluation, before the usage
        at = text.index("\n## Use\n")
        text = text[:at].rstrip("\n") + "\n\n" + section + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
    card.text = text
    new = eval_results(hellaswag=hellaswag)
    if val_loss is not None:
        new += eval_results(
            val_loss=val_loss["value"], val_tokens=val_loss.get("tokens"), data_source=val_loss.get("data_source")
        )
    if new:
        card.data.model_name = card.data.model_name or "gpt2-repro"
        card.data.eval_results = _merge_results(card.data.eval_results, new)
    write_atomic(path, str(card) if card.data.to_dict() else card.text)
    return path
