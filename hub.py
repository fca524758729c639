"""Everything about the Hub and model cards: dataset ids, published reference figures, cards, uploads.

- Ids: FineWeb-Edu (`FINEWEB_EDU`, config `sample-10BT`) and HellaSwag (`HELLASWAG_HUB_ID`, and its original URL).
- The published figures every comparison uses (`GPT2_124M`, `GPT3_124M`), declared once.
- `hub_reachable()`: whether to try the Hub at all (offline mode, or no DNS), so offline runs fail fast.
- `write_model_card(folder, ...)` writes the README.md of an export (metadata, training, evaluation, usage);
  `update_model_card(folder, ...)` adds or replaces the section that evaluate_gpt2.py measures. Cards name no
  local path (a local dataset by its file name only), list a Hub dataset in their metadata, and carry the known
  results (validation loss, HellaSwag) as `model-index` entries.
- `HubUploader(repo_id)` uploads exported folders with `huggingface_hub` on a background thread. `check_access()`
  (at start-up) checks the login and creates the repository and its `gpt2` branch, so a missing token or write
  access fails at once. Each submitted folder is first snapshotted with hard links (free, and immune to the
  trainer replacing or rotating the original), a newer submission replaces one still waiting for the same branch
  (only the newest export matters), and failures are reported as warnings. The token is whatever
  `huggingface_hub` finds (`HF_TOKEN`, `hf auth login`); this module never reads it, and scrubs anything
  token-shaped from the messages it prints.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

from atomic_io import link_tree, write_atomic
from cli import ConfigError

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
DEFAULT_DATASET_CONFIGS = {FINEWEB_EDU: "sample-10BT"}  # the config used when none is given
HELLASWAG_HUB_ID = (
    "Rowan/hellaswag"  # Hub copy; its parquet conversion loads without the dataset script
)
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_VAL_SIZE = 10042
STOCK_GPT2_BRANCH = "gpt2"  # the branch of the Hub repo that holds the stock GPT2LMHeadModel export

# Published figures: OpenAI's GPT-2 124M on the FineWeb-Edu sample-10BT val shard (build-nanogpt's play.ipynb) and
# on HellaSwag with build-nanogpt's scoring (its hellaswag.py); GPT-3 124M's HellaSwag from the GPT-3 paper.
GPT2_124M = {"val_loss": 3.2924, "hellaswag_acc_norm": 0.2955, "hellaswag_acc": 0.2859}
GPT3_124M = {"hellaswag_acc_norm": 0.337}

_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def _redact(text: str) -> str:
    return _TOKEN_RE.sub("hf_***", text)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def manifest_source(data_dir: str | os.PathLike | None) -> dict | None:
    """The data source that data_prep.py recorded in `data_dir`/manifest.json ("source"), or None."""
    try:
        source = json.loads((Path(data_dir) / "manifest.json").read_text())["source"]
    except (OSError, TypeError, ValueError, KeyError):
        return None
    return source if isinstance(source, dict) else None


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


def eval_results(
    *,
    val_loss: float | None = None,
    val_tokens: int | None = None,
    data_source: dict | None = None,
    hellaswag: dict | None = None,
    hellaswag_examples: int | None = None,
) -> list[EvalResult]:
    """`model-index` entries: validation loss on the held-out tokens of the training data, HellaSwag accuracies.

    hellaswag: {"acc_norm": ..., "acc": ...} (either may be missing); scored on fewer than all 10,042 examples,
    the entry says so in its split ("validation[:N]"), so it is never mistaken for the published protocol.
    """
    results = []
    if val_loss is not None:
        name, hub_id = describe_dataset(data_source)
        held_out = f"first {val_tokens:,} tokens, held out" if val_tokens else "held-out tokens"
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Language modeling",
                dataset_type=hub_id or "local",
                dataset_name=re.sub(r"\[([^]]+)\]\([^)]*\)", r"\1", name).replace("`", ""),
                dataset_config=(data_source or {}).get("name") if hub_id else None,
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
    """The `from_pretrained` lines of a card: the Hub repo (and branch) when known, never a local path."""
    where = repo_id or "path/to/this/folder"
    extra = (f', revision="{revision}"' if repo_id and revision else "") + (
        "" if stock_gpt2 else ", trust_remote_code=True"
    )
    tok_extra = f', revision="{revision}"' if repo_id and revision else ""
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{where}"{extra})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}"{tok_extra})\n'
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
    model, data, optim = config["model"], config["data"], config["optim"]
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
    fmt = (
        "a stock `GPT2LMHeadModel` (plain transformers)"
        if stock_gpt2
        else "our `GPT2ReproForCausalLM` (remote code)"
    )
    other = (
        f"\nThe same weights as a stock `GPT2LMHeadModel` (no remote code: lm-eval, vLLM, pipelines) are on the "
        f'`{STOCK_GPT2_BRANCH}` branch: `from_pretrained("{repo_id}", revision="{STOCK_GPT2_BRANCH}")`.\n'
        if repo_id and not stock_gpt2
        else ""
    )
    params = 12 * model["n_layer"] * model["n_embd"] ** 2 + model["vocab_size"] * model["n_embd"]
    evals = f" (at step {val_step})" if val_step is not None and val_step != step else ""
    partial = (
        f" ({hellaswag_examples:,} of {HELLASWAG_VAL_SIZE:,} examples)"
        if hellaswag_examples and hellaswag_examples != HELLASWAG_VAL_SIZE
        else ""
    )
    body = f"""
# GPT-2 reproduction, step {step:,}

A GPT-2 language model ({model["n_layer"]} layers, {model["n_head"]} heads, width {model["n_embd"]},
context {data["seq_len"]}, about {params / 1e6:.0f}M parameters) trained from scratch with the `gpt2-repro`
trainer (transformers + accelerate). This folder holds {fmt} and the GPT-2 tokenizer.
{other}
## Training
- Data: {data_text}, GPT-2 BPE, documents separated by `<|endoftext|>`.
- Steps: {step:,} of {optim["max_steps"]:,}; tokens seen: {tokens:,} ({data["total_batch_tokens"]:,} per step).
- AdamW (betas {optim["beta1"]}/{optim["beta2"]}, weight decay {optim["weight_decay"]} on matrices),
  LR {optim["max_lr"]} with {optim["warmup_steps"]} warmup steps then cosine to {optim["min_lr"]};
  gradient clipping {optim["grad_clip"]}.

## Evaluation{evals}
| metric | value | OpenAI GPT-2 124M |
|---|---|---|
| validation loss | {_fmt(val_loss, ".4f")} | {GPT2_124M["val_loss"]} (FineWeb-Edu val shard) |
| HellaSwag acc_norm{partial} | {_fmt(hellaswag_acc_norm, ".4f")} | {GPT2_124M["hellaswag_acc_norm"]} |

## Use
```python
{load_snippet(repo_id, revision, stock_gpt2)}
ids = tokenizer("Hello, I'm a language model,", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=32, do_sample=True, top_k=50)[0]))
```
"""
    path = Path(folder) / "README.md"
    write_atomic(path, str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}")))
    return path


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False when offline mode is on or the Hub's host name does not resolve: then the Hub is not tried at all
    (huggingface_hub would otherwise retry for ~25 s before giving up)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


CARD_START, CARD_END = (
    "<!-- gpt2-repro:eval-results:start -->",
    "<!-- gpt2-repro:eval-results:end -->",
)


def update_model_card(
    folder: str | os.PathLike,
    section: str,
    hellaswag: dict | None = None,
    val_loss: dict | None = None,
) -> Path:
    """Write (or replace) the evaluation `section` (markdown) of folder/README.md, keeping the rest of the card.

    `hellaswag` ({"acc_norm", "acc"}, given only when all of HellaSwag was scored) and `val_loss` ({"value",
    "tokens", "data_source"}) also go into the card's model-index metadata (the Hub's evaluation widget),
    replacing the entries of the same measurement (the trainer's, for example).
    """
    path = Path(folder) / "README.md"
    card = ModelCard(path.read_text(encoding="utf-8") if path.is_file() else "")
    section = f"{CARD_START}\n{section}\n{CARD_END}"
    text = card.text
    if CARD_START in text and CARD_END in text:
        text = (
            text[: text.index(CARD_START)] + section + text[text.index(CARD_END) + len(CARD_END) :]
        )
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
    card.text = text
    new = eval_results(hellaswag=hellaswag)
    if val_loss is not None:
        new += eval_results(
            val_loss=val_loss["value"],
            val_tokens=val_loss.get("tokens"),
            data_source=val_loss.get("data_source"),
        )
    if new:
        card.data.model_name = card.data.model_name or "gpt2-repro"
        card.data.eval_results = _merge_results(card.data.eval_results, new)
    write_atomic(path, str(card) if card.data.to_dict() else card.text)
    return path


class HubAccessError(ConfigError):
    """--push_to_hub cannot work (no token, no write access, offline): found at start-up, not at the first upload."""


def _access_error(repo_id: str, e: Exception) -> HubAccessError:
    """The one-line reason an access check failed, with the fix (the token never appears in it)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, LocalTokenNotFoundError):
        why = "no Hugging Face token found. Log in with `hf auth login` (or set HF_TOKEN)"
    elif isinstance(e, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set, so the Hub cannot be reached. Unset it"
    elif status == 401:
        why = "the Hub rejected the token (401: invalid or expired). Log in again with `hf auth login`"
    elif status == 403:
        why = (
            "the token may not write to this repository (403 Forbidden). Use a repo in your own namespace or "
            "an organization you can write to, with a token that has write access"
        )
    else:
        why = f"the Hub check failed ({type(e).__name__}: {e}). Check the network and the repo id"
    return HubAccessError(
        _redact(f"--push_to_hub {repo_id}: {why}, or train without --push_to_hub.")
    )


class HubUploader:
    """Upload folders to one Hub repo (main branch, and the `gpt2` branch for the stock export) from a
    background thread; `submit` returns at once."""

    def __init__(
        self, repo_id: str, staging_dir: str | Path, private: bool = False, api: HfApi | None = None
    ):
        self.repo_id, self.private = repo_id, private
        self.api = api if api is not None else HfApi()
        self.staging_dir = Path(staging_dir)
        self.errors: list[str] = []
        self.uploaded: list[str] = []  # commit messages of the uploads that succeeded
        self._pending: dict[
            str | None, tuple[Path, str]
        ] = {}  # branch (None: main) -> newest snapshot
        self._busy = False
        self._closed = False
        self._repo_ready = False
        self._branches: set[str] = set()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._worker, name="hub-upload", daemon=True)
        self._thread.start()

    def check_access(self) -> None:
        """Check the login, create the repository (if new) and its `gpt2` branch: a HubAccessError says why not.

        Run at start-up, so a missing token or write access stops the run in its first second. The branch is
        made now, while a new repository holds nothing, so it never starts with files of the main branch.
        """
        try:
            self.api.whoami()
            self._ensure_repo()
            self._ensure_branch(STOCK_GPT2_BRANCH)
        except (
            Exception
        ) as e:  # no token, HTTP status, offline, network (httpx errors are no OSErrors)
            raise _access_error(self.repo_id, e) from None

    def submit(self, folder: str | Path, message: str, revision: str | None = None) -> None:
        """Queue `folder` (snapshotted now) for upload to `revision` (a branch; None: main). A still-waiting
        older submission for the same branch is dropped."""
        snapshot = self.staging_dir / re.sub(r"\W+", "-", f"{revision or 'main'} {message}").strip(
            "-"
        )
        link_tree(folder, snapshot)
        with self._cond:
            older = self._pending.get(revision)
            if older is not None and older[0] != snapshot:
                shutil.rmtree(older[0], ignore_errors=True)
            self._pending[revision] = (snapshot, message)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or uploading; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._pending and not self._busy, timeout=timeout
            )

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued uploads, then stop the thread. False if they did not finish within `timeout`."""
        done = self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return done

    def _worker(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                # the main branch first (our export before its stock twin), then the other branches
                revision = None if None in self._pending else next(iter(self._pending))
                snapshot, message = self._pending.pop(revision)
                self._busy = True
            where = f"{self.repo_id}" + (f" (branch {revision})" if revision else "")
            try:
                self._upload(snapshot, message, revision)
                self.uploaded.append(message if revision is None else f"{message} ({revision})")
            except Exception as e:  # the network, auth, quota: report and let training go on
                msg = _redact(
                    f"Hub upload of {message!r} to {where} failed: {type(e).__name__}: {e}"
                )
                self.errors.append(msg)
                warnings.warn(msg, stacklevel=1)
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _ensure_repo(self) -> None:
        if not self._repo_ready:
            self.api.create_repo(
                self.repo_id, repo_type="model", private=self.private, exist_ok=True
            )
            self._repo_ready = True

    def _ensure_branch(self, branch: str) -> None:
        if branch not in self._branches:
            self.api.create_branch(self.repo_id, branch=branch, repo_type="model", exist_ok=True)
            self._branches.add(branch)

    def _upload(self, folder: Path, message: str, revision: str | None) -> None:
        self._ensure_repo()
        if revision is not None:
            self._ensure_branch(revision)
        # A branch that holds one export is made to mirror it exactly (files of an older export that this one
        # lacks are deleted); the main branch only gains and updates files, whatever else its owner keeps there.
        mirror = {"delete_patterns": "*"} if revision is not None else {}
        self.api.upload_folder(
            repo_id=self.repo_id,
            repo_type="model",
            folder_path=str(folder),
            commit_message=message,
            revision=revision,
            **mirror,
        )
