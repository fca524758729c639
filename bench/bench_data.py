"""Data benchmark: data_prep.py's tokenization vs build-nanogpt's method, and the training loader's speed.

    python bench/bench_data.py --text data/tinyshakespeare.txt [--mb 20] [--repeats 3]

1. Builds a parquet of at least --mb MB of text: copies of --text cut into ~4 KB documents (FineWeb-Edu's
   documents average a few KB).
2. Tokenizes it into shards, interleaving the variants (A B C, then C B A, ...), each on all cores:
   - data_prep: `data_prep.prepare` end to end (stream -> tokenizer threads -> shards + manifest);
   - baseline: build-nanogpt's fineweb.py method: `load_dataset` (non-streaming, cache built beforehand), a
     `multiprocessing.Pool(cores)` mapping tiktoken's `encode_ordinary` over single documents (chunksize 16),
     tokens as Python lists -> uint16 arrays, written to .npy shards;
   - processes: data_prep's batches of documents tokenized by a `multiprocessing.Pool` instead of threads (the
     alternative design, for the threads-vs-processes choice).
   All three must produce the same tokens (checked). Prints tokens/s and ratios (target data_prep/baseline >= 1.5).
3. TokenShardLoader tokens/s serving (64, 1024) batches from the shards just written (target >= 20M tokens/s).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_prep as dp  # noqa: E402
import text_stream  # noqa: E402
import token_data  # noqa: E402
from gpt2_tokenizer import EOT_ID, get_gpt2_encoding  # noqa: E402

SHARD_TOKENS = 2_000_000
VAL_TOKENS = 1_000_000


def build_parquet(text_file: Path, min_mb: float, path: Path, doc_chars: int = 4000) -> int:
    """Copies of the text cut at paragraph boundaries into ~doc_chars documents, until min_mb MB. Returns bytes."""
    paragraphs = text_file.read_text().split("\n\n")
    docs, current = [], []
    for p in paragraphs:
        current.append(p)
        if sum(len(c) for c in current) >= doc_chars:
            docs.append("\n\n".join(current))
            current = []
    docs.append("\n\n".join(current))
    size = sum(len(d.encode()) for d in docs)
    copies = int(np.ceil(min_mb * 1e6 / size))
    texts = [f"[copy {c}] {d}" for c in range(copies) for d in docs]
    table = pa.table({"text": texts, "id": [f"doc-{i}" for i in range(len(texts))]})
    pq.write_table(table, path, row_group_size=1000)
    return sum(len(t.encode()) for t in texts)


# --- baseline: build-nanogpt fineweb.py's method (re-implemented from its description) ---------------------------

_enc = None


def _baseline_init():
    global _enc
    _enc = get_gpt2_encoding()


def _baseline_tokenize(doc: dict) -> np.ndarray:
    tokens = [EOT_ID]
    tokens.extend(_enc.encode_ordinary(doc["text"]))
    return np.array(tokens).astype(np.uint16)


def run_baseline(parquet: Path, out: Path, cores: int, cache_dir: Path) -> int:
    from datasets import load_dataset

    docs = load_dataset("parquet", data_files=str(parquet), split="train", cache_dir=str(cache_dir))
    out.mkdir()
    with mp.Pool(cores, initializer=_baseline_init) as pool:
        save = lambda i, buf: np.save(out / f"base_{'val' if i == 0 else 'train'}_{i:06d}.npy", buf)
        return _pack_into_shards(pool.imap(_baseline_tokenize, docs, chunksize=16), save)


def _pack_into_shards(token_arrays, save) -> int:
    """Cut a stream of token arrays into a val shard then train shards; save(index, tokens). Returns the count."""
    index, total, fill = 0, 0, 0
    buf = np.empty(VAL_TOKENS, dtype=np.uint16)
    for tokens in token_arrays:
        pos = 0
        while pos < len(tokens):
            take = min(len(buf) - fill, len(tokens) - pos)
            buf[fill : fill + take] = tokens[pos : pos + take]
            fill, pos = fill + take, pos + take
            if fill == len(buf):
                save(index, buf)
                index, total, fill = index + 1, total + fill, 0
                buf = np.empty(SHARD_TOKENS, dtype=np.uint16)
    if fill:
        save(index, buf[:fill])
    return total + fill


# --- processes: data_prep's batches of documents, tokenized by a process pool instead of threads ----------------


def _process_encode(texts: list) -> np.ndarray:
    return text_stream.encode_documents(_enc, texts)[0]


def run_processes(parquet: Path, out: Path, cores: int) -> int:
    src = text_stream.open_text_stream(str(parquet))
    out.mkdir()
    batches = (b["text"] for b in src.dataset.iter(batch_size=dp.PrepConfig.batch_docs))
    with mp.Pool(cores, initializer=_baseline_init) as pool:
        save = lambda i, buf: token_data.write_shard(
            out / f"proc_{'val' if i == 0 else 'train'}_{i:06d}.bin", buf
        )
        return _pack_into_shards(pool.imap(_process_encode, batches), save)


def run_data_prep(parquet: Path, out: Path, cores: int) -> int:
    cfg = dp.PrepConfig(
        dataset=str(parquet),
        output_dir=str(out),
        num_workers=cores,
        shard_tokens=SHARD_TOKENS,
        val_tokens=VAL_TOKENS,
        progress=False,
    )
    return dp.prepare(cfg)["tokens"]


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the Pool workers), user + system."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def all_tokens(folder: Path) -> np.ndarray:
    return np.concatenate(
        [
            np.asarray(token_data.read_shard(f))
            for f in sorted(folder.iterdir())
            if f.suffix in (".bin", ".npy")
        ]
    )


def bench_thread_copies(parquet: Path) -> dict:
    """CPU seconds per M tokens of tiktoken on one thread: main thread, another thread with the shared Encoding,
    and another thread with its own copy (what data_prep's tokenizer threads use)."""
    shared = get_gpt2_encoding()
    batches = [
        b["text"] for b in text_stream.open_text_stream(str(parquet)).dataset.iter(batch_size=256)
    ][:8]

    def run(copy: bool) -> float:
        enc = text_stream._thread_copy(shared) if copy else shared
        t0, n = time.thread_time(), 0
        for texts in batches:
            n += sum(len(enc.encode_to_numpy(t, disallowed_special=())) for t in texts)
        return (time.thread_time() - t0) / n * 1e6

    results = {}
    for name, copy, in_thread in [
        ("main thread, shared", False, False),
        ("other thread, shared", False, True),
        ("other thread, own copy", True, True),
    ]:
        if in_thread:
            with ThreadPoolExecutor(1) as pool:
                pool.submit(run, copy).result()  # warm-up
                results[name] = pool.submit(run, copy).result()
        else:
            run(copy)
            results[name] = run(copy)
    return results


def bench_loader(folder: Path, steps: int, batch_size: int = 64, seq_len: int = 1024) -> dict:
    results = {}
    for name, kwargs in {"rank 0 of 1": {}, "rank 3 of 8": {"rank": 3, "world_size": 8}}.items():
        loader = token_data.TokenShardLoader(
            folder, batch_size=batch_size, seq_len=seq_len, **kwargs
        )
        for _ in range(5):  # warm the page cache and the per-epoch plan
            loader.next_batch()
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = loader.next_batch()
        dt = time.perf_counter() - t0
        results[name] = steps * batch_size * seq_len / dt
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, required=True, help="a text file, e.g. tinyshakespeare")
    ap.add_argument(
        "--mb", type=float, default=20.0, help="minimum MB of text in the benchmark parquet"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader_steps", type=int, default=300)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)"
    )
    args = ap.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.workdir))
    import datasets

    datasets.disable_progress_bars()
    try:
        parquet = work / "bench.parquet"
        n_bytes = build_parquet(args.text, args.mb, parquet)
        get_gpt2_encoding()
        from datasets import load_dataset

        load_dataset(
            "parquet", data_files=str(parquet), split="train", cache_dir=str(work / "hf_cache")
        )  # 1-time
        print(
            f"{n_bytes / 1e6:.1f} MB of text ({pq.ParquetFile(parquet).metadata.num_rows} documents), {cores} cores"
        )

        variants = {
            "data_prep (threads)": lambda out: run_data_prep(parquet, out, cores),
            "baseline (Pool per document)": lambda out: run_baseline(
                parquet, out, cores, work / "hf_cache"
            ),
            "processes (Pool per batch)": lambda out: run_processes(parquet, out, cores),
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {
            name: [] for name in variants
        }  # CPU seconds per million tokens
        reference = None
        for r in range(args.repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                out = work / f"out_{r}_{list(variants).index(name)}"
                t0, c0 = time.perf_counter(), cpu_seconds()
                n_tokens = variants[name](out)
                rates[name].append(n_tokens / (time.perf_counter() - t0))
                cpu[name].append((cpu_seconds() - c0) / n_tokens * 1e6)
                tokens = all_tokens(out)
                if reference is None:
                    reference = tokens
                assert np.array_equal(tokens, reference), f"{name} produced different tokens"
                if not (r == args.repeats - 1 and name == "data_prep (threads)"):
                    shutil.rmtree(out)
                else:
                    shards = out
        print(
            f"\ntokenization, {len(reference):,} tokens, median (min-max) of {args.repeats} interleaved runs:"
        )
        med = {name: statistics.median(v) for name, v in rates.items()}
        for name, v in rates.items():
            print(
                f"  {name:30s} {med[name] / 1e6:6.2f}M tokens/s  ({min(v) / 1e6:.2f}-{max(v) / 1e6:.2f})"
                f"  {statistics.median(cpu[name]):.3f} CPU-s per M tokens"
            )
        base = med["baseline (Pool per document)"]
        cpu_base = statistics.median(cpu["baseline (Pool per document)"])
        for name in ("data_prep (threads)", "processes (Pool per batch)"):
            eff = cpu_base / statistics.median(cpu[name])
            print(
                f"  {name} / baseline: {med[name] / base:.2f}x tokens/s, {eff:.2f}x less CPU per token"
            )
        print("  target: data_prep / baseline >= 1.5x tokens/s")

        print(
            "\ntiktoken CPU seconds per M tokens on one thread (why data_prep gives each thread its own copy):"
        )
        for name, value in bench_thread_copies(parquet).items():
            print(f"  {name:30s} {value:.3f}")

        loader = bench_loader(shards, args.loader_steps)
        print(
            f"\nTokenShardLoader, (64, 1024) int64 batches, {args.loader_steps} steps (target >= 20M tokens/s):"
        )
        for name, rate in loader.items():
            print(f"  {name:30s} {rate / 1e6:8.1f}M tokens/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
