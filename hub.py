"""Everything about the Hub and model cards: dataset ids, published reference figures, cards, uploads.

- Ids: FineWeb-Edu (`FINEWEB_EDU`, config `sample-10BT`) and HellaSwag (`HELLASWAG_HUB_ID`, and its original URL).
- The published figures every comparison uses (`GPT2_124M`, `GPT3_124M`), declared once.
- `hub_reachable()`: whether to try the Hub at all (offline mode, or no DNS), so offline runs fail fast.
- `write_model_card(folder, ...)` writes the README.md of an export (metadata, training, evaluation, usage);
  `update_model_card(folder, ...)` adds or replaces the section that evaluate_gpt2.py measures.
- `HubUploader(repo_id)` uploads exported folders with `huggingface_hub` on a background thread. Each submitted
  folder is first snapshotted with hard links (free, and immune to the trainer replacing or rotating the original),
  a newer submission replaces one still waiting (only the newest export matters), and failures are reported as
  warnings. The token is whatever `huggingface_hub` finds (`HF_TOKEN`, `hf auth login`); this module never reads
  it, and scrubs anything token-shaped from the messages it prints.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from atomic_io import link_tree, write_atomic

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
DEFAULT_DATASET_CONFIGS = {FINEWEB_EDU: "sample-10BT"}  # the config used when none is given
HELLASWAG_HUB_ID = (
    "Rowan/hellaswag"  # Hub copy; its parquet conversion loads without the dataset script
)
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_VAL_SIZE = 10042

# Published figures: OpenAI's GPT-2 124M on the FineWeb-Edu sample-10BT val shard (build-nanogpt's play.ipynb) and
# on HellaSwag with build-nanogpt's scoring (its hellaswag.py); GPT-3 124M's HellaSwag from the GPT-3 paper.
GPT2_124M = {"val_loss": 3.2924, "hellaswag_acc_norm": 0.2955, "hellaswag_acc": 0.2859}
GPT3_124M = {"hellaswag_acc_norm": 0.337}

_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def _redact(text: str) -> str:
    return _TOKEN_RE.sub("hf_***", text)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_model_card(
    folder: str | Path,
    *,
    step: int,
    tokens: int,
    config: dict,
    val_loss: float | None = None,
    val_step: int | None = None,
    hellaswag_acc_norm: float | None = None,
    data_source: str | None = None,
    where: str = "PATH_OR_REPO",
    stock_gpt2: bool = False,
) -> Path:
    """README.md in `folder`: Hub metadata plus a human summary. Returns its path.

    `where` is the folder or Hub repo the card tells users to load the model from.
    """
    model, data, optim = config["model"], config["data"], config["optim"]
    hub_id = (data_source or "").split(" ")[
        0
    ]  # "HuggingFaceFW/fineweb-edu (sample-10BT)" -> the Hub id
    hub_dataset = (
        hub_id if re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id) and not Path(hub_id).exists() else None
    )
    metadata = ModelCardData(
        language="en",
        license="mit",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2", "gpt2-repro", "causal-lm"] + ([] if stock_gpt2 else ["custom_code"]),
        datasets=[hub_dataset] if hub_dataset else None,
    )
    remote = "" if stock_gpt2 else ", trust_remote_code=True"
    fmt = (
        "a stock `GPT2LMHeadModel` (plain transformers)"
        if stock_gpt2
        else "our `GPT2ReproForCausalLM` (remote code)"
    )
    params = 12 * model["n_layer"] * model["n_embd"] ** 2 + model["vocab_size"] * model["n_embd"]
    evals = f" (at step {val_step})" if val_step is not None and val_step != step else ""
    body = f"""
# GPT-2 reproduction, step {step:,}

A GPT-2 language model ({model["n_layer"]} layers, {model["n_head"]} heads, width {model["n_embd"]},
context {data["seq_len"]}, about {params / 1e6:.0f}M parameters) trained from scratch with the `gpt2-repro`
trainer (transformers + accelerate). This folder holds {fmt} and the GPT-2 tokenizer.

## Training
- Data: {data_source or "token shards in " + data["data_dir"]}, GPT-2 BPE, documents separated by `<|endoftext|>`.
- Steps: {step:,} of {optim["max_steps"]:,}; tokens seen: {tokens:,} ({data["total_batch_tokens"]:,} per step).
- AdamW (betas {optim["beta1"]}/{optim["beta2"]}, weight decay {optim["weight_decay"]} on matrices),
  LR {optim["max_lr"]} with {optim["warmup_steps"]} warmup steps then cosine to {optim["min_lr"]};
  gradient clipping {optim["grad_clip"]}.

## Evaluation{evals}
| metric | value | OpenAI GPT-2 124M |
|---|---|---|
| validation loss | {_fmt(val_loss, ".4f")} | {GPT2_124M["val_loss"]} (FineWeb-Edu val shard) |
| HellaSwag acc_norm | {_fmt(hellaswag_acc_norm, ".4f")} | {GPT2_124M["hellaswag_acc_norm"]} |

## Use
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{where}"{remote})
tokenizer = AutoTokenizer.from_pretrained("{where}")
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
    folder: str | os.PathLike, section: str, hellaswag: dict | None = None
) -> Path:
    """Write (or replace) the evaluation `section` (markdown) of folder/README.md, keeping the rest of the card.

    `hellaswag` ({"acc_norm", "acc"}, given only when all of HellaSwag was scored) also goes into the card's
    model-index metadata (the Hub's evaluation widget).
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
    if hellaswag is not None:
        kept = [r for r in card.data.eval_results or [] if r.dataset_type != HELLASWAG_HUB_ID]
        card.data.model_name = card.data.model_name or Path(folder).resolve().name
        card.data.eval_results = kept + [
            EvalResult(
                task_type="text-generation",
                dataset_type=HELLASWAG_HUB_ID,
                dataset_name="HellaSwag",
                dataset_split="validation",
                metric_type=metric,
                metric_value=round(hellaswag[metric], 4),
            )
            for metric in ("acc_norm", "acc")
        ]
    write_atomic(path, str(card) if card.data.to_dict() else card.text)
    return path


class HubUploader:
    """Upload folders to one Hub repo from a background thread; `submit` returns at once."""

    def __init__(
        self, repo_id: str, staging_dir: str | Path, private: bool = False, api: HfApi | None = None
    ):
        self.repo_id, self.private = repo_id, private
        self.api = api if api is not None else HfApi()
        self.staging_dir = Path(staging_dir)
        self.errors: list[str] = []
        self.uploaded: list[str] = []  # commit messages of the uploads that succeeded
        self._pending: tuple[Path, str] | None = None
        self._busy = False
        self._closed = False
        self._repo_ready = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._worker, name="hub-upload", daemon=True)
        self._thread.start()

    def submit(self, folder: str | Path, message: str) -> None:
        """Queue `folder` (snapshotted now) for upload; a still-waiting older submission is dropped."""
        snapshot = self.staging_dir / re.sub(r"\W+", "-", message).strip("-")
        link_tree(folder, snapshot)
        with self._cond:
            if self._pending is not None and self._pending[0] != snapshot:
                shutil.rmtree(self._pending[0], ignore_errors=True)
            self._pending = (snapshot, message)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or uploading; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending is None and not self._busy, timeout=timeout
            )

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued upload, then stop the thread. False if it did not finish within `timeout`."""
        done = self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return done

    def _worker(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                (snapshot, message), self._pending = self._pending, None
                self._busy = True
            try:
                self._upload(snapshot, message)
                self.uploaded.append(message)
            except Exception as e:  # the network, auth, quota: report and let training go on
                msg = _redact(
                    f"Hub upload of {message!r} to {self.repo_id} failed: {type(e).__name__}: {e}"
                )
                self.errors.append(msg)
                warnings.warn(msg, stacklevel=1)
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, folder: Path, message: str) -> None:
        if not self._repo_ready:
            self.api.create_repo(
                self.repo_id, repo_type="model", private=self.private, exist_ok=True
            )
            self._repo_ready = True
        self.api.upload_folder(
            repo_id=self.repo_id, repo_type="model", folder_path=str(folder), commit_message=message
        )
