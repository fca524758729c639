"""Data benchmark: data_prep.py against the common multiprocessing.Pool method, and the training loaders' speed.

    python bench/bench_data.py --corpus data/tinyshakespeare.txt:4000 --corpus /usr/share/dictd/gcide.index

Each `--corpus` becomes a parquet of at least --mb MB of text (copies of the corpus) whose documents are either a
text file cut at blank lines into documents of about N characters (`FILE:N`; `FILE:0`: one paragraph each) or the
entries of a dictd dictionary (`FILE.index`, read with its `.dict` or `.dict.dz`). Per corpus:

1. Tokenization, each variant a whole process (start-up, imports and writing included) on all cores, run in turn
   A B C, then C B A, ... (`--repeats`), with the load average before and after:
   - data_prep: `python data_prep.py` (stream -> tokenizer threads -> shards + manifest);
   - pool: build-nanogpt's fineweb.py method, the common one: `load_dataset` (not streamed; its Arrow cache is
     built beforehand, untimed), a `multiprocessing.Pool(cores)` mapping tiktoken's `encode_ordinary` over
     single documents (chunksize 16), Python lists -> uint16 arrays, .npy shards;
   - pool-batches: data_prep's batches of documents tokenized in a process pool instead of threads.
   All must write the same tokens (checked). Prints tokens/s and CPU seconds per million tokens (median, min-max)
   and the ratios (target: data_prep / pool >= 1.5).
2. CPU seconds per million tokens of one batch of 512 documents on one thread: one tiktoken call per batch (what
   text_stream.encode_documents does) or one per document (before), each with the thread's own Encoding copy;
   and one call per batch with the Encoding another thread made.
3. Loaders, tokens/s per process after start-up: StreamingTokenLoader, (64, 1024) batches tokenized on the fly
   from the parquet, as process 0 of 1 and of 2 (target >= 1M); TokenShardLoader on data_prep's shards.
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_TOKENS = 20_000_000
VAL_TOKENS = 1_000_000
DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# ---------------------------------------------------------------------------------------------------- corpora


def read_documents(spec: str) -> tuple[str, list[str]]:
    """(a short name, the documents) of a --corpus spec: FILE:N (text cut at blank lines) or FILE.index (dictd)."""
    if spec.endswith(".index"):
        index = Path(spec)
        dz = index.with_suffix(".dict.dz")
        data = gzip.decompress(dz.read_bytes()) if dz.exists() else index.with_suffix(".dict").read_bytes()
        entries = {}  # several headwords may point at one entry: each entry once, in file order
        for line in index.read_text(encoding="utf-8").splitlines():
            offset, length = (_dictd_number(v) for v in line.split("\t")[1:3])
            entries[offset] = length
        docs = [data[o : o + n].decode("utf-8", "replace") for o, n in sorted(entries.items())]
        return index.stem, docs
    path, _, size = spec.rpartition(":")
    if not path or not size.isdigit():
        raise SystemExit(f"--corpus {spec}: expected FILE:CHARS_PER_DOCUMENT or a dictd FILE.index")
    docs, current = [], []
    for paragraph in Path(path).read_text(encoding="utf-8").split("\n\n"):
        current.append(paragraph)
        if sum(len(c) for c in current) >= int(size):
            docs.append("\n\n".join(current))
            current = []
    docs += ["\n\n".join(current)] if current else []
    return f"{Path(path).stem}:{size}", docs


def _dictd_number(text: str) -> int:
    """dictd's base-64 numbers (offsets and lengths in its .index)."""
    value = 0
    for c in text:
        value = value * 64 + DICTD_DIGITS.index(c)
    return value


def build_parquet(docs: list[str], min_mb: float, path: Path) -> tuple[int, int]:
    """Copies of the documents (each marked with its copy number) until min_mb MB. Returns (bytes, documents)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = sum(len(d.encode()) for d in docs)
    copies = int(np.ceil(min_mb * 1e6 / size))
    texts = [f"[copy {c}] {d}" for c in range(copies) for d in docs]
    table = pa.table({"text": texts, "id": [f"doc-{i}" for i in range(len(texts))]})
    pq.write_table(table, path, row_group_size=1000)
    return sum(len(t.encode()) for t in texts), len(texts)


# ----------------------------------------------------------------------------------- the compared processes

_enc = None


def _pool_init():
    global _enc
    from gpt2_repro.data.tokenizer import get_gpt2_encoding

    _enc = get_gpt2_encoding()


def _encode_one(doc: dict) -> np.ndarray:
    """build-nanogpt's fineweb.py `tokenize`: EOT, then the document, as a Python list -> uint16."""
    tokens = [50256]
    tokens.extend(_enc.encode_ordinary(doc["text"]))
    return np.array(tokens).astype(np.uint16)


def _encode_batch(texts: list) -> np.ndarray:
    from gpt2_repro.data import text_stream as text_stream

    return text_stream.encode_documents(_enc, texts)[0]


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


def run_pool(parquet: str, out: str, cache_dir: str) -> None:
    from datasets import load_dataset

    docs = load_dataset("parquet", data_files=parquet, split="train", cache_dir=cache_dir)
    Path(out).mkdir()
    save = lambda i, buf: np.save(Path(out) / f"pool_{i:06d}.npy", buf)
    with mp.Pool(os.cpu_count(), initializer=_pool_init) as pool:
        _pack_into_shards(pool.imap(_encode_one, docs, chunksize=16), save)


def run_pool_batches(parquet: str, out: str) -> None:
    from gpt2_repro.data import text_stream as text_stream
    from gpt2_repro.data.shards import write_shard

    src = text_stream.open_text_stream(parquet)
    Path(out).mkdir()
    batches = (b["text"] for b in src.dataset.iter(batch_size=512))
    save = lambda i, buf: write_shard(Path(out) / f"proc_{i:06d}.bin", buf)
    with mp.Pool(os.cpu_count(), initializer=_pool_init) as pool:
        _pack_into_shards(pool.imap(_encode_batch, batches), save)


def variant_commands(parquet: Path, out: Path, cache: Path) -> dict[str, list[str]]:
    me = [sys.executable, str(Path(__file__).resolve())]
    data_prep = [sys.executable, str(ROOT / "data_prep.py"), "--dataset", str(parquet)]
    data_prep += ["--output_dir", str(out), "--progress", "false"]
    data_prep += ["--val_tokens", str(VAL_TOKENS), "--shard_tokens", str(SHARD_TOKENS)]
    return {
        "data_prep": data_prep,
        "pool": [*me, "--run", "pool", str(parquet), str(out), str(cache)],
        "pool-batches": [*me, "--run", "pool-batches", str(parquet), str(out)],
    }


def children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def all_tokens(folder: Path) -> np.ndarray:
    from gpt2_repro.data.shards import read_shard

    files = [f for f in folder.iterdir() if f.suffix in (".bin", ".npy")]
    files.sort(key=lambda f: f.stem.rsplit("_", 1)[-1])  # by shard index: val first
    return np.concatenate([np.asarray(read_shard(f)) for f in files])


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    v = [x / scale for x in values]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def bench_tokenization(parquet: Path, work: Path, names: list[str], repeats: int) -> tuple[dict, Path]:
    """Whole processes, interleaved. Returns ({variant: {"rate": [...], "cpu": [...]}}, data_prep's last output)."""
    results = {name: {"rate": [], "cpu": []} for name in names}
    reference, kept = None, None
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            out = work / f"out_{name}_{r}"
            cmd = variant_commands(parquet, out, work / "hf_cache")[name]
            t0, c0 = time.perf_counter(), children_cpu()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall, cpu = time.perf_counter() - t0, children_cpu() - c0
            tokens = all_tokens(out)
            reference = tokens if reference is None else reference
            assert np.array_equal(tokens, reference), f"{name} wrote other tokens"
            results[name]["rate"].append(len(tokens) / wall)
            results[name]["cpu"].append(cpu / len(tokens) * 1e6)
            if name == "data_prep":
                shutil.rmtree(kept or work / "none", ignore_errors=True)
                kept = out
            else:
                shutil.rmtree(out)
    return results | {"tokens": len(reference)}, kept


# ------------------------------------------------------------------------------- one batch, on one thread


def _per_document(encoding, texts: list) -> np.ndarray:
    """The way encode_documents worked before: one tiktoken call and one small array per document."""
    parts = []
    for text in texts:
        if isinstance(text, str) and text and not text.isspace():
            parts += (np.array([50256], dtype=np.uint32), encoding.encode_to_numpy(text, disallowed_special=()))
    return np.concatenate(parts).astype(np.uint16)


def bench_one_thread(parquet: Path, repeats: int, max_tokens: int = 3_000_000) -> dict:
    from gpt2_repro.data import text_stream as text_stream
    from gpt2_repro.data.tokenizer import get_gpt2_encoding

    shared = get_gpt2_encoding()
    batches, n = [], 0
    for batch in text_stream.open_text_stream(str(parquet)).dataset.iter(batch_size=512):
        batches.append(batch["text"])
        n += sum(len(t) for t in batch["text"]) // 3
        if n > max_tokens:
            break

    def run(how: str) -> float:
        own = text_stream._thread_copy(shared)
        t0, tokens = time.thread_time(), 0
        for texts in batches:
            if how == "one call per batch":
                tokens += len(text_stream.encode_documents(shared, texts)[0])
            elif how == "one call per document":
                tokens += len(_per_document(own, texts))
            else:  # encode_documents' one call, with the Encoding the main thread made
                joined = text_stream.EOT_TEXT + text_stream.EOT_TEXT.join(t for t in texts if t.strip())
                ids = shared.encode_to_numpy(joined, allowed_special={text_stream.EOT_TEXT})
                tokens += len(ids.astype(np.uint16))
        return (time.thread_time() - t0) / tokens * 1e6

    ways = ["one call per batch", "one call per document", "one call per batch, shared Encoding"]
    results = {w: [] for w in ways}
    with ThreadPoolExecutor(1) as pool:
        pool.submit(run, ways[0]).result()  # warm-up: the thread's copy, the page cache
        for r in range(repeats):
            for way in ways if r % 2 == 0 else ways[::-1]:
                results[way].append(pool.submit(run, way).result())
    return results


# ------------------------------------------------------------------------------------------------- loaders


def bench_loaders(parquet: Path, shards: Path, tokens: int, repeats: int) -> dict:
    from gpt2_repro.data.shard_loader import TokenShardLoader
    from gpt2_repro.data.stream_loader import StreamingTokenLoader, StreamSpec

    B, T = 64, 1024
    steps = max(1, tokens // (B * T))

    def streaming(world_size: int) -> float:
        stream = StreamSpec(str(parquet), val_tokens=VAL_TOKENS, shard_tokens=SHARD_TOKENS)
        loader = StreamingTokenLoader(stream, batch_size=B, seq_len=T, world_size=world_size)
        loader.next_batch()  # start-up: the validation tokens, the first block
        t0 = time.perf_counter()
        for _ in range(steps):
            loader.next_batch()
        rate = steps * B * T / (time.perf_counter() - t0)
        loader.close()
        return rate

    def sharded() -> float:
        loader = TokenShardLoader(shards, batch_size=B, seq_len=T)
        for _ in range(5):
            loader.next_batch()
        t0 = time.perf_counter()
        for _ in range(steps):
            loader.next_batch()
        return steps * B * T / (time.perf_counter() - t0)

    ways = {
        "StreamingTokenLoader, process 0 of 1": lambda: streaming(1),
        "StreamingTokenLoader, process 0 of 2": lambda: streaming(2),
        "TokenShardLoader (shards in the page cache)": sharded,
    }
    results = {name: [] for name in ways}
    for r in range(repeats):
        for name in list(ways) if r % 2 == 0 else list(ways)[::-1]:
            results[name].append(ways[name]())
    return results


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", action="append", required=True, help="FILE:CHARS or FILE.index")
    ap.add_argument("--mb", type=float, default=100.0, help="minimum MB of text per benchmark parquet")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="data_prep,pool,pool-batches")
    ap.add_argument("--loader_tokens", type=int, default=10_000_000, help="tokens per loader measurement")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()

    import datasets

    datasets.disable_progress_bars()
    names = args.variants.split(",")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    for spec in args.corpus:
        work = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.workdir))
        try:
            name, docs = read_documents(spec)
            parquet = work / "corpus.parquet"
            n_bytes, n_docs = build_parquet(docs, args.mb, parquet)
            if "pool" in names:  # the baseline reads Arrow files load_dataset made beforehand
                datasets.load_dataset("parquet", data_files=str(parquet), cache_dir=str(work / "hf_cache"))
            load = os.getloadavg()[0]
            results, shards = bench_tokenization(parquet, work, names, args.repeats)
            n = results.pop("tokens")
            print(
                f"\n== {name}: {n_bytes / 1e6:.0f} MB, {n_docs:,} documents, {n:,} tokens "
                f"({n / n_docs:.0f} per document); load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
            )
            print(f"whole processes, median (min-max) of {args.repeats}, interleaved:")
            for variant, r in results.items():
                print(
                    f"  {variant:14s} {spread(r['rate'], 1e6)}M tokens/s   "
                    f"{spread(r['cpu'], digits=3)} CPU-s per M tokens"
                )
            if "pool" in results:
                base = statistics.median(results["pool"]["rate"])
                for variant in (v for v in results if v != "pool"):
                    pairs = zip(results[variant]["rate"], results["pool"]["rate"], strict=True)
                    ratios = [a / b for a, b in pairs]
                    print(
                        f"  {variant} / pool: {statistics.median(results[variant]['rate']) / base:.2f}x "
                        f"tokens/s (rounds {min(ratios):.2f}-{max(ratios):.2f}x)"
                    )

            print("\none batch of 512 documents on one thread, CPU-s per M tokens, median (min-max):")
            for way, values in bench_one_thread(parquet, args.repeats).items():
                print(f"  {way:38s} {spread(values, digits=3)}")

            if shards is not None:
                print(f"\nloaders, tokens/s per process over {args.loader_tokens / 1e6:.0f}M tokens:")
                for way, rates in bench_loaders(parquet, shards, args.loader_tokens, 3).items():
                    print(f"  {way:44s} {spread(rates, 1e6)}M")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--run":  # one compared process (see variant_commands)
        {"pool": run_pool, "pool-batches": run_pool_batches}[sys.argv[2]](*sys.argv[3:])
    else:
        main()
