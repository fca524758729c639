"""Synthetic stand-ins for real data, shared by the tests and the benchmarks (one generator per kind of data).

- `hellaswag_examples`: HellaSwag-shaped multiple-choice examples of varied lengths;
- `make_texts` / `write_fineweb_parquet`: documents and a parquet file with FineWeb-Edu's columns;
- `reference_tokens`: what data preparation must produce from documents (tiktoken, EOT before each one);
- `reference_windows`: what each process of the streaming loader must serve from documents (shuffle off);
- `learnable_tokens`: a token stream a tiny model can learn (a random Markov chain over a few GPT-2 ids);
- `FlakyReads`: an unreliable network: reads of some files fail, a given number of times;
- `tiny_repro`: a 2-layer GPT2ReproForCausalLM, seeded.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import sys
from pathlib import Path

import numpy as np

EOT = 50256
SEQ_LEN, VAL_WINDOWS = 64, 5  # validation windows of the evaluation tests: two processes get 3 and 2
SENTENCE_WORDS = [
    "the",
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "child",
    "ball",
    "water",
    "road",
    "kitchen",
    "guitar",
    "runs",
    "jumps",
    "walks",
    "throws",
    "picks",
    "plays",
    "cuts",
    "into",
    "over",
    "under",
    "onto",
    "slowly",
    "quickly",
    "then",
    "and",
    "while",
    "she",
    "he",
    "it",
    "they",
    "his",
    "her",
    "with",
    "on",
    "in",
]
PROSE = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there can all their we one been has more would its who will no if out so said what up about "
    "into them than some could only other time then learning energy photosynthesis molecule 1984 3.14 e.g. Mr. "
    "naïve café 日本語 😀 ( ) , . ; : ! ? <|endoftext|> don't it's"
)
DOCUMENT_WORDS = PROSE.split() + ["\n", "\n\n", "  "]


def hellaswag_examples(n: int, seed: int = 0, ctx_words=(3, 40), ending_words=(1, 14)) -> list[dict]:
    """HellaSwag-shaped examples {"ctx", "endings": 4 str, "label"} with varied lengths (batches need padding).

    HellaSwag's own lengths are about ctx_words=(10, 80), ending_words=(4, 30).
    """
    rng = random.Random(seed)
    sentence = lambda lo, hi: " ".join(rng.choices(SENTENCE_WORDS, k=rng.randint(lo, hi)))
    return [
        {
            "ctx": sentence(*ctx_words).capitalize() + ".",
            "endings": [sentence(*ending_words) for _ in range(4)],
            "label": i % 4,
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_texts(n: int, seed: int, words=(5, 300)) -> list:
    """`n` documents of random prose (unicode, numbers, a literal "<|endoftext|>", blank lines)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(DOCUMENT_WORDS, int(rng.integers(*words)))) for _ in range(n)]


def write_fineweb_parquet(path: Path, texts: list, row_group_size: int = 50) -> Path:
    """A parquet file with FineWeb-Edu's columns holding `texts`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(texts)
    rng = np.random.default_rng(n)
    table = pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "id": [f"<urn:uuid:{path.stem}-{i:06d}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{path.stem}/{i}" for i in range(n)],
            "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": pa.array(rng.uniform(0.65, 1.0, n), pa.float64()),
            "token_count": pa.array([len(t.split()) if t else 0 for t in texts], pa.int64()),
            "score": pa.array(rng.uniform(2.5, 5.0, n), pa.float64()),
            "int_score": pa.array(rng.integers(3, 6, n), pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def reference_tokens(encoding, texts) -> np.ndarray:
    """tiktoken's tokens with one EOT before each non-empty document (uint16)."""
    ids = []
    for t in texts:
        if isinstance(t, str) and t.strip():
            ids += [EOT, *encoding.encode_ordinary(t)]
    return np.array(ids, dtype=np.uint16)


def reference_windows(
    encoding, texts, val_tokens: int, shard_tokens: int, seq_len: int, rank=0, world_size=1
) -> np.ndarray:
    """(n, T+1): one epoch of the windows process `rank` of `world_size` must be served from `texts`, shuffle off.

    Written from the layout's description, not from the loader's code: the first val_tokens + 1 tokens of all the
    documents are validation (val_tokens scored targets); the documents after the one they end in go to the
    processes in turn (the one they end in goes to process 0, without its validation part); each process cuts its
    own token stream into shards of shard_tokens and each shard into windows of T+1 tokens every T tokens, dropping
    each shard's short tail.
    """
    docs = [reference_tokens(encoding, [t]) for t in texts]
    ends = np.cumsum([len(d) for d in docs])
    val = val_tokens + 1
    first = int(np.searchsorted(ends, val, side="right"))  # the document holding the first training token
    mine = [docs[i] for i in range(first + rank, len(docs), world_size)]
    if rank == 0:
        mine[0] = mine[0][val - (int(ends[first - 1]) if first else 0) :]
    tokens, T, windows = np.concatenate(mine), seq_len, []
    for start in range(0, len(tokens), shard_tokens):
        shard = tokens[start : start + shard_tokens]
        windows += [shard[i * T : i * T + T + 1] for i in range((len(shard) - 1) // T)]
    return np.array(windows, dtype=np.uint16)


class FlakyReads:
    """An unreliable network for tests: reading a file whose path contains `match` fails `failures` times.

    While installed (`with FlakyReads(...)`, or `install()` for a whole process), `open` hands back such files
    wrapped so that the first `failures` read() calls, counted over all of them, raise ConnectionResetError;
    later reads succeed. Only the file reads are replaced: everything above them is the real code.
    """

    def __init__(self, match: str, failures: int):
        self.match, self.failures, self.failed = match, failures, 0
        self._real_open = None

    def install(self) -> FlakyReads:
        self._real_open = builtins.open
        builtins.open = self._open
        return self

    def uninstall(self) -> None:
        builtins.open = self._real_open

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _open(self, file, mode="r", *args, **kwargs):
        handle = self._real_open(file, mode, *args, **kwargs)
        # prepare.py's source fingerprint hashes the local file itself, and text_stream.py opens each local file
        # once before streaming (is it readable?): local checks, not reads of the stream
        if sys._getframe(1).f_globals.get("__name__") in ("gpt2_repro.data.prepare", "gpt2_repro.data.text_stream"):
            return handle
        if isinstance(file, (str, os.PathLike)) and self.match in os.fspath(file):  # parquet "rb", text "r"
            return _FlakyFile(handle, self)
        return handle


class _FlakyFile:
    def __init__(self, handle, flaky: FlakyReads):
        self._handle, self._flaky = handle, flaky

    def read(self, *args):
        if self._flaky.failed < self._flaky.failures:
            self._flaky.failed += 1
            raise ConnectionResetError("connection reset by peer (FlakyReads, a test stand-in)")
        return self._handle.read(*args)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def learnable_tokens(n: int, seed: int = 0, vocab: int = 200, successors: int = 3) -> np.ndarray:
    """`n` GPT-2 ids from a random Markov chain: `vocab` distinct ids, each followed by one of `successors`."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(50257, size=vocab, replace=False)
    nxt = rng.integers(0, vocab, size=(vocab, successors))
    idx = np.empty(n, dtype=np.int64)
    idx[0] = 0
    choices = rng.integers(0, successors, size=n)
    for i in range(1, n):
        idx[i] = nxt[idx[i - 1], choices[i]]
    return ids[idx]


def tiny_repro(seed: int = 0, n_positions: int = 128):
    """A 2-layer, 64-wide GPT2ReproForCausalLM (padded vocabulary), initialised from `seed`, in eval mode."""
    import torch

    from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM

    torch.manual_seed(seed)
    config = GPT2ReproConfig(n_layer=2, n_head=4, n_embd=64, n_positions=n_positions, vocab_size=50304)
    return GPT2ReproForCausalLM(config).eval()
