"""Generate text from a trained model, printed token by token as it comes.

    python sample.py --model runs/tiny --prompt "ROMEO:"                      # a run folder: its newest export
    python sample.py --model runs/tiny/checkpoints/step_00000100 --num_samples 3 --temperature 0.8
    python sample.py --model gpt2 --prompt "Hello, I'm a language model," --top_k 40   # OpenAI's, for comparison

The model: a run folder (train.py's --output_dir; its export/ is the newest checkpoint's model), a checkpoint or an
export folder, or a Hub id of a causal LM with GPT-2's vocabulary. The prompt starts a document, as every document
started in training (end-of-text first). Sampling is top-k with a temperature (0: greedy), seeded: the same command
prints the same text on the same machine. The text is the GPT-2 BPE's (tiktoken), streamed by
gpt2_repro/evaluation/sampling.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gpt2_repro.base import cli
from gpt2_repro.base.cli import opt
from gpt2_repro.base.errors import ConfigError


@dataclass
class SampleArgs:
    """Command line of sample.py (each field is an option)."""

    model: str = opt(help="a run folder (its export/), a checkpoint or export folder, or a Hub id (gpt2)")
    sample_prompt: str = opt("Hello, I'm a language model,", "the text to continue", aliases=("prompt",))
    sample_tokens: int = opt(100, "new tokens per sample (fewer if the model ends the text)", aliases=("tokens",))
    num_samples: int = opt(1, "samples, one after another", aliases=("count",))
    temperature: float = opt(1.0, "divides the logits before sampling; 0: greedy (always the likeliest token)")
    top_k: int | None = opt(50, "sample among the k likeliest tokens only (none: among all)")
    seed: int = opt(1337, "seed of the sampling: the same seed gives the same samples")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: a GPU when there is one")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = opt("float32", "weights' dtype (auto: checkpoint's)")
    trust_remote_code: bool = opt(False, "a Hub model's own code (ours load without it: the project registers them)")
    vocab_file: str | None = opt(None, "GPT-2 vocabulary r50k_base.tiktoken for offline machines")

    def validate(self) -> None:
        if self.sample_tokens < 1 or self.num_samples < 1:
            raise ConfigError(f"--sample_tokens {self.sample_tokens} and --num_samples {self.num_samples} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature} must be >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top_k {self.top_k} must be >= 1, or none for every token")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed {self.seed} must be in [0, 2**32)")


def main(argv: list[str] | None = None) -> list[str]:
    """Print the samples as they are generated; return their texts (the continuations, without the prompt)."""
    args = cli.parse(SampleArgs, argv, __doc__.split("\n\n")[0])  # imports no torch: --help answers at once
    import os
    from pathlib import Path

    import torch
    import transformers

    from gpt2_repro.base.errors import EvaluationInputError, NotFound
    from gpt2_repro.data.tokenizer import get_gpt2_encoding
    from gpt2_repro.evaluation.models import check_vocab, context_length, load_model
    from gpt2_repro.evaluation.sampling import (
        SampleSettings,
        TokenStreamer,
        check_room,
        model_location,
        prompt_ids,
        sample_stream,
    )

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here. Use --device cpu (or auto).")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    try:
        encoding = get_gpt2_encoding(args.vocab_file)
    except RuntimeError as e:  # offline without a cached vocabulary: the message gives the fix
        raise ConfigError(str(e)) from None
    check_room(prompt_ids(encoding, args.sample_prompt), args.sample_tokens, None)  # no context known yet
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar above the text
    try:
        model = load_model(model_location(args.model), args.dtype, args.trust_remote_code).to(device)
    except EvaluationInputError as e:
        if Path(args.model).exists() or os.sep not in args.model:
            raise
        raise NotFound(f"there is no folder {args.model} here (and no Hub model of that name could be loaded)") from e
    check_vocab(model, encoding.n_vocab)
    check_room(prompt_ids(encoding, args.sample_prompt), args.sample_tokens, context_length(model))
    settings = SampleSettings(args.sample_prompt, args.sample_tokens, args.temperature, args.top_k, args.seed)
    torch.manual_seed(args.seed)  # the samples of one command follow each other from this seed (CPU and CUDA)
    texts = []
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} of {args.num_samples}", flush=True)
        print(args.sample_prompt, end="", flush=True)
        streamer = TokenStreamer(encoding)
        sample_stream(model, encoding, settings, streamer)
        texts.append(streamer.text)
    return texts


if __name__ == "__main__":
    cli.run(main)
