"""Synthetic stand-ins for real data, shared by the tests and the benchmarks (one generator per kind of data).

- `hellaswag_examples`: HellaSwag-shaped multiple-choice examples of varied lengths;
- `make_texts` / `write_fineweb_parquet`: documents and a parquet file with FineWeb-Edu's columns;
- `reference_tokens`: what data preparation must produce from documents (tiktoken, EOT before each one);
- `learnable_tokens`: a token stream a tiny model can learn (a random Markov chain over a few GPT-2 ids).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

EOT = 50256
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


def hellaswag_examples(
    n: int, seed: int = 0, ctx_words=(3, 40), ending_words=(1, 14)
) -> list[dict]:
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
