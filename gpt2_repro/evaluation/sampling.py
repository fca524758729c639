"""Sampling from a trained model with the text printed as it is generated (what sample.py runs).

The text goes out through `TokenStreamer`, a transformers streamer (`generate(..., streamer=...)`) written here over
tiktoken rather than transformers' `TextStreamer`: tiktoken is the tokenizer the project trains and evaluates with
(the same ids, offline from its cache, for our folders and for OpenAI's `gpt2` alike), and each token's bytes go
through an incremental UTF-8 decoder, so a character is printed as soon as its last byte is generated, where
TextStreamer decodes the whole text again at every token and holds it back to the next space.
"""

from __future__ import annotations

import codecs
import sys
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import ConfigError, NotFound
from ..data.tokenizer import EOT_ID


def model_location(name: str) -> str:
    """What `load_model` reads for `name`: a run folder (train.py's --output_dir) means its newest model, export/;
    a model folder (an export, a checkpoint) or a Hub id is itself."""
    path = Path(name)
    if not path.is_dir() or (path / "config.json").is_file():
        return name
    if (path / "export" / "config.json").is_file():
        return str(path / "export")
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        raise NotFound(
            f"{name} is a run folder without a model yet: export/ appears with its first checkpoint "
            "(--checkpoint_every). Sample a checkpoint folder instead, or wait for one."
        )
    raise NotFound(f"{name} holds no model: pass a run folder, a model folder (config.json) or a Hub id.")


class TokenStreamer:
    """A `generate` streamer that prints each new token's text as soon as it makes whole characters.

    generate calls `put` with the prompt first (1, P), then with each new token (1,), and `end` once; one sequence
    at a time. End-of-text ends the sample and is not printed. `text` is what was printed.
    """

    def __init__(self, encoding, out=None):
        self.encoding, self.out = encoding, sys.stdout if out is None else out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # bytes of a character may span tokens
        self.prompt_seen, self.pieces = False, []

    def put(self, value) -> None:
        if not self.prompt_seen:  # the prompt, already printed
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if token != EOT_ID:
                self._write(self.decoder.decode(self.encoding.decode_single_token_bytes(token)))

    def end(self) -> None:
        self._write(self.decoder.decode(b"", final=True))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            self.out.write(text)
            self.out.flush()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class SampleSettings:
    """How to sample: `tokens` new tokens after `prompt`; temperature 0 is greedy; top_k None keeps every token."""

    prompt: str
    tokens: int
    temperature: float = 1.0
    top_k: int | None = 50
    seed: int = 1337


def prompt_ids(encoding, prompt: str) -> list[int]:
    """The prompt as a document's start, as training saw every document: end-of-text, then its tokens."""
    return [EOT_ID, *encoding.encode(prompt)]


def check_room(ids: list[int], tokens: int, context: int | None) -> None:
    """The prompt and the new tokens must fit the model's context (its position table ends there)."""
    if context is not None and len(ids) + tokens > context:
        room = context - len(ids)
        fix = f"lower --sample_tokens to {room} or less" if room > 0 else "shorten the prompt"
        raise ConfigError(
            f"the prompt ({len(ids)} tokens with the end-of-text before it) and --sample_tokens {tokens} exceed "
            f"the model's context of {context} tokens: {fix}"
        )


def sample_stream(model, encoding, settings: SampleSettings, streamer: TokenStreamer) -> list[int]:
    """One sample of `settings.tokens` new tokens (fewer if the model ends the text), streamed; its new ids."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(encoding, settings.prompt)], device=device)  # (1, P)
    greedy = settings.temperature == 0
    kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": settings.temperature}
    kwargs |= {} if greedy else {"top_k": settings.top_k or 0}  # 0: transformers' "no top-k"
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=settings.tokens,
            pad_token_id=EOT_ID,
            eos_token_id=EOT_ID,
            streamer=streamer,
            **kwargs,
        )  # (1, P + new)
    return out[0, ids.shape[1] :].tolist()
