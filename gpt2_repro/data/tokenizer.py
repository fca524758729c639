"""The GPT-2 BPE, as a tiktoken `Encoding` for speed and as a Hugging Face tokenizer for saved models.

One source of truth: both come from the same mergeable-ranks table, so `AutoTokenizer` on an exported
checkpoint gives exactly tiktoken's ids.

Where the vocabulary comes from, first match wins:
1. `vocab_file=` (a `.tiktoken` file such as `r50k_base.tiktoken`, or a folder holding one or a tiktoken cache);
2. the `GPT2_REPRO_VOCAB` environment variable (same forms), for clusters without internet;
3. tiktoken's own loader for `r50k_base` (byte-identical to GPT-2's BPE): it reads `TIKTOKEN_CACHE_DIR` if set,
   and otherwise downloads once into tiktoken's cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from ..base.atomic_io import user_cache, write_atomic
from ..base.errors import NotFound

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257  # 50,000 merges + 256 bytes + <|endoftext|>
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation regex (tiktoken calls it r50k_pat_str).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
VOCAB_ENV = "GPT2_REPRO_VOCAB"


def _resolve_vocab_file(path: str | os.PathLike) -> Path:
    """A `.tiktoken` file, or a folder holding one (a tiktoken cache names it by the SHA-1 of its URL)."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = [p / hashlib.sha1(R50K_URL.encode()).hexdigest(), p / "r50k_base.tiktoken", p / "gpt2.tiktoken"]
        candidates += sorted(p.glob("*.tiktoken"))
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise NotFound(
                f"No GPT-2 vocabulary in folder {p}: expected r50k_base.tiktoken (or a tiktoken cache holding it). "
                f"Copy r50k_base.tiktoken there, or pass the file itself."
            )
        return found
    if not p.is_file():
        raise NotFound(f"GPT-2 vocabulary file not found: {p}. Pass the path of r50k_base.tiktoken.")
    return p


def _encoding_from_file(path: Path) -> tiktoken.Encoding:
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=R50K_SHA256)
    except ValueError as e:
        raise ValueError(
            f"{path} is not the GPT-2 vocabulary (its SHA-256 differs from r50k_base's {R50K_SHA256[:12]}...). "
            "Use the r50k_base.tiktoken file that tiktoken downloads."
        ) from e
    return tiktoken.Encoding(
        name="r50k_base",
        pat_str=GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def get_gpt2_encoding(vocab_file: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The GPT-2 BPE as a tiktoken `Encoding` (50,257 ids, end-of-text 50256). See the module docstring."""
    vocab_file = vocab_file or os.environ.get(VOCAB_ENV)
    return _load_encoding(str(_resolve_vocab_file(vocab_file)) if vocab_file else None)


@functools.lru_cache(maxsize=4)
def _load_encoding(vocab_file: str | None) -> tiktoken.Encoding:
    if vocab_file:
        return _encoding_from_file(Path(vocab_file))
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # requests' ConnectionError, or a blocked proxy
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "(unset)")
        raise RuntimeError(
            f"Could not load the GPT-2 vocabulary (r50k_base) through tiktoken: {type(e).__name__}: {e}. "
            f"Offline? Set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds it (now: {cache}), or set "
            f"{VOCAB_ENV} / pass vocab_file= with the path of r50k_base.tiktoken."
        ) from e


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken's {token bytes: rank} into a BPE vocabulary and merge list in GPT-2's byte alphabet.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a merge list ordered by the
    rank of the merged token, holding every split of a token into two known tokens, reproduces that exactly.
    """
    alphabet = _bytes_to_unicode()
    to_str = lambda b: "".join(alphabet[x] for x in b)
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], to_str(left), to_str(right)))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges]


# Bump when `_build_backend` changes what it builds: the cached copies of the old recipe are then ignored.
BACKEND_RECIPE = 1


def _build_backend(encoding: tiktoken.Encoding):
    """`encoding` as a `tokenizers.Tokenizer`: byte-level BPE with tiktoken's split pattern and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = _vocab_and_merges(encoding._mergeable_ranks)
    for token, idx in encoding._special_tokens.items():
        vocab[token] = idx
    backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(encoding._pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _cached_backend(encoding: tiktoken.Encoding):
    """`_build_backend(encoding)`, kept in the user cache (atomic_io.user_cache): building the merge list takes about
    0.5 s at every start of train.py, reading the saved tokenizer 0.2 s. The file name holds everything
    the build depends on; a cache that cannot be read or written is rebuilt or skipped, never an error."""
    import tokenizers
    from tokenizers import Tokenizer

    ranks = sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1])  # hashed in ~0.04 s
    key = [ranks, encoding._pat_str, sorted(encoding._special_tokens.items()), tokenizers.__version__, BACKEND_RECIPE]
    path = user_cache("tokenizer") / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:20]}.json"
    with contextlib.suppress(Exception):  # missing or damaged: build it again
        backend = Tokenizer.from_file(str(path))
        if backend.get_vocab_size() == encoding.n_vocab:
            return backend
    backend = _build_backend(encoding)
    with contextlib.suppress(OSError):  # a read-only home: the next start builds it again
        write_atomic(path, backend.to_str())
    return backend


def build_hf_tokenizer(encoding: tiktoken.Encoding | None = None, model_max_length: int = 1024):
    """A `GPT2TokenizerFast` equal to `encoding` (default: `get_gpt2_encoding()`), ready for `save_pretrained`.

    Its padding token is end-of-text, as GPT-2 users set it (GPT-2 has no padding token of its own), so batched
    tokenization and `pipeline("text-generation", batch_size=...)` work; the models' generation configs say the same.
    """
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(
        tokenizer_object=_cached_backend(encoding or get_gpt2_encoding()),
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        model_max_length=model_max_length,
        add_prefix_space=False,
    )
