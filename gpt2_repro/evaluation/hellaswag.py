"""HellaSwag's validation examples: where they come from, what a valid one is, and how one is rendered as tokens.

`load_hellaswag()` reads hellaswag_val.jsonl (10,042 examples; `--hellaswag_file`, or downloaded once from
rowanz/hellaswag, else the Hub's parquet, and cached); `render_example` gives each ending's tokens after the
context, build-nanogpt's rendering, which `evaluation.score_hellaswag` scores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..base.atomic_io import user_cache, write_atomic
from ..base.errors import EvaluationInputError, HellaSwagUnavailable
from ..base.machine import hub_reachable
from ..base.published import HELLASWAG_HUB_ID, HELLASWAG_URL

URL_ENV = "GPT2_REPRO_HELLASWAG_URL"  # a mirror of hellaswag_val.jsonl


def download_hellaswag(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached hellaswag_val.jsonl; downloads it first (rowanz/hellaswag, else the Hub parquet) if missing."""
    dest = Path(cache_dir) if cache_dir else user_cache("hellaswag")
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
            raise ConnectionError("offline (HF_HUB_OFFLINE set, or the Hub's host does not resolve)")
        import datasets

        ds = datasets.load_dataset(HELLASWAG_HUB_ID, split="validation", revision="refs/convert/parquet")
        lines = (json.dumps({"ctx": r["ctx"], "endings": r["endings"], "label": int(r["label"])}) for r in ds)
        write_atomic(dest, "\n".join(lines) + "\n")
        return dest
    except Exception as e:  # offline, Hub refusal, no parquet conversion: all mean "not available here"
        errors.append(f"Hub dataset {HELLASWAG_HUB_ID}: {type(e).__name__}: {e}")
    raise HellaSwagUnavailable(
        "Could not download the HellaSwag validation set (" + "; ".join(errors) + "). Offline? Copy "
        f"hellaswag_val.jsonl (from {HELLASWAG_URL}) to this machine and pass --hellaswag_file PATH, or put it at "
        f"{dest}.",
        cache=dest,
    )


def _parse_example(line: str, where: str) -> dict:
    """One JSON line -> {"ctx": str, "endings": [4 str], "label": int}, or a ValueError naming the line."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvaluationInputError(f"{where}: not valid JSON ({e.msg}). Each line must be one JSON object.") from None
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
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise EvaluationInputError(f"{where}: endings must be a list of 4 strings, got {endings!r}.")
    if isinstance(label, str) and label.strip().isdigit():  # the Hub copy stores "0".."3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
        raise EvaluationInputError(f"{where}: label must be the index 0-3 of the right ending, got {label!r}.")
    return {"ctx": ctx, "endings": endings, "label": label}


def load_hellaswag(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """HellaSwag validation examples [{"ctx", "endings", "label"}] from a jsonl file (None: download and cache).

    Raises HellaSwagUnavailable when no file was given and none can be downloaded (offline), EvaluationInputError
    when the file given is missing, not UTF-8 text or has a malformed line.
    """
    if limit is not None and limit < 1:
        raise EvaluationInputError(f"limit must be a positive number of examples, got {limit}.")
    if path is None:
        path = download_hellaswag()
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"HellaSwag file not found: {path}. Pass the path of hellaswag_val.jsonl.")
    examples = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EvaluationInputError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}). Use the "
                    "original hellaswag_val.jsonl, or re-encode the file as UTF-8."
                ) from None
            if line.strip():
                examples.append(_parse_example(line, f"{path}:{lineno}"))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise EvaluationInputError(f"{path} holds no examples: expected one JSON object per line.")
    return examples


def render_example(encoding, example: dict, max_len: int | None = None) -> tuple[list[int], list[list[int]]]:
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
