"""data_prep.py: shards, preparation (resume, bad input), the training/validation loaders and the streaming loader.

Every test builds its own data: a FineWeb-shaped parquet of generated text, or synthetic shards whose token values
are their positions (so a window's first token says which shard and offset it came from).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data_prep as dp

ROOT = Path(__file__).resolve().parents[1]
EOT = 50256
PROSE = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there can all their we one been has more would its who will no if out so said what up about "
    "into them than some could only other time then learning energy photosynthesis molecule 1984 3.14 e.g. Mr. "
    "naïve café 日本語 😀 ( ) , . ; : ! ? <|endoftext|> don't it's"
)
WORDS = PROSE.split() + ["\n", "\n\n", "  "]


def make_texts(n: int, seed: int, words=(5, 300)) -> list:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(*words)))) for _ in range(n)]


def write_fineweb_parquet(path: Path, texts: list, row_group_size: int = 50) -> Path:
    """A parquet file with FineWeb-Edu's columns."""
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
    """tiktoken's tokens with one EOT before each non-empty document."""
    ids = []
    for t in texts:
        if isinstance(t, str) and t.strip():
            ids += [EOT, *encoding.encode_ordinary(t)]
    return np.array(ids, dtype=np.uint16)


def shard_stream(out: Path, manifest: dict) -> np.ndarray:
    return np.concatenate([np.asarray(dp.read_shard(out / s["file"])) for s in manifest["shards"]])


def folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="session")
def fineweb(tmp_path_factory):
    """(parquet path, its texts): 400 generated documents plus empty, whitespace-only and null ones."""
    texts = make_texts(400, seed=0)
    texts[3], texts[50], texts[120] = "", "   \n ", None
    path = write_fineweb_parquet(tmp_path_factory.mktemp("fineweb") / "fineweb_sample.parquet", texts)
    return path, texts


def prep(dataset, out, **kw) -> dict:
    kw = {"val_tokens": 3000, "shard_tokens": 10_000, "num_workers": 2, "batch_docs": 16, **kw}
    return dp.prepare(dp.PrepConfig(dataset=str(dataset), output_dir=str(out), **kw))


# ---------------------------------------------------------------------------------------------------------------
# Shard files


def test_shard_header_layout_and_roundtrip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 42], dtype=np.int64)
    sha = dp.write_shard(tmp_path / "x_train_000001.bin", tokens)
    raw = (tmp_path / "x_train_000001.bin").read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert sha == hashlib.sha256(raw).hexdigest()
    back = dp.read_shard(tmp_path / "x_train_000001.bin")
    assert back.dtype == np.uint16 and back.tolist() == tokens.tolist()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="uint16"):
        dp.write_shard(tmp_path / "bad.bin", np.array([70000]))


def test_read_shard_names_file_and_problem(tmp_path):
    good = tmp_path / "a_train_000001.bin"
    dp.write_shard(good, np.arange(100))
    raw = good.read_bytes()

    def bad(name, data):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    cases = {
        bad("trunc.bin", raw[:-10]): "truncated: the header says 100 tokens",
        bad("long.bin", raw + b"\0\0"): "trailing bytes",
        bad("tiny.bin", raw[:100]): "truncated or not a token shard: 100 bytes",
        bad("foreign.bin", b"PK\x03\x04" + bytes(2000)): "not an llm.c token shard",
        bad("v2.bin", np.array([20240520, 2, 100], "<i4").tobytes() + raw[12:]): "version 2",
    }
    for path, message in cases.items():
        with pytest.raises(dp.DataError, match=message) as e:
            dp.read_shard(path)
        assert str(path) in str(e.value)
    np.save(tmp_path / "f32.npy", np.zeros(10, np.float32))
    with pytest.raises(dp.DataError, match="1-D uint16"):
        dp.read_shard(tmp_path / "f32.npy")
    with pytest.raises(FileNotFoundError):
        dp.read_shard(tmp_path / "absent.bin")


# ---------------------------------------------------------------------------------------------------------------
# Preparation


def test_encode_documents_delimits_and_skips(gpt2_encoding):
    texts = ["hello world", "", None, 42, " ", "a <|endoftext|> b", "lone \ud800 surrogate"]
    tokens, skipped = dp.encode_documents(gpt2_encoding, texts)
    assert skipped == 4
    fixed = "lone \ud800 surrogate".encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    expected = reference_tokens(gpt2_encoding, ["hello world", "a <|endoftext|> b", fixed])
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected.tolist()
    assert int((tokens == EOT).sum()) == 3  # the literal "<|endoftext|>" text is ordinary tokens


def test_prepare_parquet_tokens_and_manifest(fineweb, gpt2_encoding, tmp_path):
    path, texts = fineweb
    out = tmp_path / "out"
    m = prep(path, out)
    ref = reference_tokens(gpt2_encoding, texts)
    assert m["complete"] and m["tokens"] == len(ref)
    assert m["documents"] == 397 and m["skipped_documents"] == 3
    assert np.array_equal(shard_stream(out, m), ref)
    names = [s["file"] for s in m["shards"]]
    assert names[0] == "fineweb-sample_val_000000.bin" and names[1] == "fineweb-sample_train_000001.bin"
    sizes = [s["tokens"] for s in m["shards"]]
    assert sizes[0] == 3000 and all(n == 10_000 for n in sizes[1:-1]) and 0 < sizes[-1] <= 10_000
    assert m["val_tokens"] == 3000 and m["train_tokens"] == len(ref) - 3000
    for s in m["shards"]:
        assert s["sha256"] == hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
        assert s["documents"] == int((dp.read_shard(out / s["file"]) == EOT).sum())
    assert m["source"]["data_files"] == [str(path.resolve())] and m["source"]["text_column"] == "text"
    assert m["tokenizer"]["eot_token"] == EOT and m["document_delimiter"] == "eot_before_each_document"
    assert json.loads((out / "manifest.json").read_text()) == m
    # Rerunning a finished run changes nothing.
    before = folder_bytes(out)
    assert prep(path, out)["complete"]
    assert folder_bytes(out) == before


def test_max_tokens_takes_an_exact_prefix(fineweb, gpt2_encoding, tmp_path):
    path, texts = fineweb
    m = prep(path, tmp_path / "o", max_tokens=12_345)
    assert m["tokens"] == 12_345 and [s["tokens"] for s in m["shards"]] == [3000, 9345]
    assert np.array_equal(shard_stream(tmp_path / "o", m), reference_tokens(gpt2_encoding, texts)[:12_345])


def test_jsonl_text_folder_and_glob_take_the_same_path(fineweb, gpt2_encoding, tmp_path):
    _, texts = fineweb
    docs = [t for t in texts[:60] if t]
    ref = reference_tokens(gpt2_encoding, docs)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(docs)))
    txt_dir = tmp_path / "books"
    txt_dir.mkdir()
    for i, t in enumerate(docs):
        (txt_dir / f"book_{i:03d}.txt").write_text(t)
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    write_fineweb_parquet(pq_dir / "part_0.parquet", docs[:25])
    write_fineweb_parquet(pq_dir / "part_1.parquet", docs[25:])
    for i, (dataset, kw) in enumerate(
        [(jsonl, {"text_column": "body"}), (txt_dir, {}), (pq_dir, {}), (f"{pq_dir}/*.parquet", {})]
    ):
        m = prep(dataset, tmp_path / f"out{i}", val_tokens=1000, **kw)
        assert np.array_equal(shard_stream(tmp_path / f"out{i}", m), ref), dataset


def test_interrupted_run_resumes_byte_identical(gpt2_encoding, tmp_path):
    """SIGKILL a real CLI run once it has written training shards, rerun, compare with an uninterrupted run."""
    texts = make_texts(1500, seed=1, words=(50, 400))
    data = write_fineweb_parquet(tmp_path / "big.parquet", texts)
    args = ["--dataset", str(data), "--val_tokens", "5000", "--shard_tokens", "1500", "--batch_docs", "4"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "data_prep.py"), *args, "--output_dir", str(out), "--num_workers", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 90
    while not list(out.glob("*_train_000002.bin")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and "resume" in manifest, "the run finished before it could be interrupted"
    finished = {s["file"] for s in manifest["shards"]}

    cfg = dict(val_tokens=5000, shard_tokens=1500, batch_docs=4)
    m_resumed = prep(data, out, num_workers=2, **cfg)
    m_clean = prep(data, tmp_path / "clean", num_workers=1, **cfg)
    assert len(finished) < len(m_clean["shards"])
    assert m_resumed == m_clean
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")
    assert np.array_equal(shard_stream(out, m_resumed), reference_tokens(gpt2_encoding, texts))


def test_output_dir_of_another_source_is_refused_untouched(gpt2_encoding, fineweb, tmp_path):
    path, texts = fineweb
    out = tmp_path / "out"
    prep(path, out, max_tokens=20_000)
    before = folder_bytes(out)
    other = write_fineweb_parquet(tmp_path / "other.parquet", texts[:100])
    with pytest.raises(dp.DataError, match=r"another source.*data_files.*other\.parquet"):
        prep(other, out, max_tokens=20_000)
    with pytest.raises(dp.DataError, match="settings.shard_tokens: 10000 there, 5000 now"):
        prep(path, out, max_tokens=20_000, shard_tokens=5000)
    assert folder_bytes(out) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    dp.write_shard(foreign / "fineweb_train_000001.bin", np.arange(10))
    before = folder_bytes(foreign)
    with pytest.raises(dp.DataError, match="fineweb_train_000001.bin.*no manifest.json"):
        prep(path, foreign)
    assert folder_bytes(foreign) == before


def test_bad_inputs_give_clear_errors(gpt2_encoding, fineweb, tmp_path):
    path, _ = fineweb
    out = tmp_path / "out"
    with pytest.raises(dp.DataError, match=r"no column 'content'.*'text', 'id', 'dump', 'url'"):
        prep(path, out, text_column="content")
    with pytest.raises(dp.DataError, match="'token_count' holds .*int64.*not text"):
        prep(path, out, text_column="token_count")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        prep(tmp_path / "missing.parquet", out)
    with pytest.raises(FileNotFoundError, match="no file matches this glob"):
        prep(tmp_path / "nothing" / "*.parquet", out)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    write_fineweb_parquet(corrupt / "a.parquet", ["fine"])
    (corrupt / "b.parquet").write_bytes(b"this is not parquet" * 10)
    with pytest.raises(dp.DataError, match=r"Cannot read .*b\.parquet"):
        prep(corrupt, out)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_fineweb_parquet(mixed / "a.parquet", ["fine"])
    (mixed / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(dp.DataError, match="all parquet, all jsonl/json or all txt"):
        prep(mixed, out)
    empty = write_fineweb_parquet(tmp_path / "empty.parquet", ["", None, "  "])
    with pytest.raises(dp.DataError, match=r"no tokens.*\(3 skipped\)"):
        prep(empty, out)
    with pytest.raises(dp.DataError, match="must be positive"):
        prep(path, out, shard_tokens=0)
    with pytest.raises(dp.DataError, match="single split 'train', not 'validation'"):
        prep(path, out, split="validation")
    assert not list(out.glob("*.bin"))


def test_cli_unknown_hub_dataset(gpt2_encoding, tmp_path):
    """Offline (HF_HUB_OFFLINE=1, the network boundary) the Hub error is wrapped in a message with the fixes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "data_prep.py", "--dataset", "no-such-org/no-such-dataset", "--output_dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Could not open dataset 'no-such-org/no-such-dataset'" in r.stderr and "local files" in r.stderr
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Training loader, on synthetic shards whose token values are positions

LENGTHS = [1000, 1537, 700, 2050]
T = 16


@pytest.fixture
def synthetic(tmp_path):
    """Four train shards; shard s holds values base_s + arange(n_s), with gaps so no window can span two shards."""
    bases = np.cumsum([0] + [n + 100 for n in LENGTHS[:-1]])
    for s, (base, n) in enumerate(zip(bases, LENGTHS, strict=True)):
        dp.write_shard(tmp_path / f"syn_train_{s + 1:06d}.bin", base + np.arange(n))
    dp.write_shard(tmp_path / "syn_val_000000.bin", np.arange(5000) + 30_000)
    return tmp_path, bases


def window_starts(x: torch.Tensor, y: torch.Tensor) -> list[int]:
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, x[:, :1] + torch.arange(x.shape[1]))  # contiguous: never spans a shard boundary
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    return x[:, 0].tolist()


def stream(loaders, steps) -> list[int]:
    """First tokens of windows in global order: step by step, rank by rank."""
    return [s for _ in range(steps) for loader in loaders for s in window_starts(*loader.next_batch())]


def check_epoch(starts: list[int], bases, shuffle: bool) -> None:
    """`starts` is exactly one epoch: every shard's full window grid (step T) once."""
    windows = [(n - 1) // T for n in LENGTHS]
    assert len(starts) == len(set(starts)) == sum(windows)
    shard_of = np.searchsorted(bases, starts, side="right") - 1
    for s, (base, n) in enumerate(zip(bases, LENGTHS, strict=True)):
        local = np.sort(np.array(starts)[shard_of == s] - base)
        assert len(local) == windows[s]
        offset = local[0]
        assert np.array_equal(local, offset + T * np.arange(windows[s]))
        assert offset + windows[s] * T + 1 <= n and (shuffle or offset == 0)


@pytest.mark.parametrize("world_size,batch_size", [(1, 5), (3, 4), (4, 2)])
def test_loader_ranks_disjoint_and_cover_each_epoch(synthetic, world_size, batch_size):
    path, bases = synthetic
    loaders = [dp.TokenShardLoader(path, "train", batch_size, T, r, world_size, seed=7) for r in range(world_size)]
    W = loaders[0].windows_per_epoch
    assert sum((n - 1) // T for n in LENGTHS) == W
    assert loaders[0].dropped_tokens_per_epoch == sum(n - 1 - (n - 1) // T * T for n in LENGTHS)
    per_step = world_size * batch_size
    starts = stream(loaders, steps=(3 * W) // per_step + 1)
    for e in range(3):
        check_epoch(starts[e * W : (e + 1) * W], bases, shuffle=True)
    assert starts[:W] != starts[W : 2 * W]  # reshuffled
    assert loaders[0].epoch == len(starts) // W


def test_loader_shuffle_is_seeded_per_epoch_and_off_means_in_order(synthetic):
    path, bases = synthetic
    W = sum((n - 1) // T for n in LENGTHS)

    def epochs(seed, shuffle, n=2):
        loader = dp.TokenShardLoader(path, batch_size=1, seq_len=T, seed=seed, shuffle=shuffle)
        return [stream([loader], W) for _ in range(n)]

    a, b = epochs(1, True), epochs(1, True)
    assert a == b and a[0] != a[1] and epochs(2, True)[0] != a[0]
    shard_order = lambda starts: list(dict.fromkeys(np.searchsorted(bases, starts, side="right") - 1))
    orders = [shard_order(e) for e in epochs(1, True, 6)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len({tuple(o) for o in orders}) > 1
    plain = epochs(0, False)
    expected = [b + k * T for b, n in zip(bases, LENGTHS, strict=True) for k in range((n - 1) // T)]
    assert plain[0] == plain[1] == expected


def test_loader_resume_is_exact_and_survives_world_size_change(synthetic):
    path, _ = synthetic

    def make(rank, world, bs=4):
        return dp.TokenShardLoader(path, batch_size=bs, seq_len=T, rank=rank, world_size=world, seed=3)

    ref = [make(r, 2) for r in range(2)]
    stream(ref, 37)
    state = ref[0].state_dict()
    assert state == ref[1].state_dict() and len(json.dumps(state)) < 200
    expected = stream(ref, 10)  # crosses the epoch boundary at step W / 8 = 41
    resumed = [make(r, 2) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(json.loads(json.dumps(state)))
    assert stream(resumed, 10) == expected
    # Resume on 1 rank with batch 8: the same windows in the same global order.
    single = make(0, 1, bs=8)
    single.load_state_dict(state)
    assert stream([single], 10) == expected
    with pytest.raises(ValueError, match="seed: 3 saved, 4 now"):
        dp.TokenShardLoader(path, batch_size=4, seq_len=T, seed=4).load_state_dict(state)


def test_loader_reads_build_nanogpt_npy_and_rejects_bad_shards(tmp_path):
    np.save(tmp_path / "edufineweb_train_000001.npy", np.arange(3000, dtype=np.uint16))
    np.save(tmp_path / "edufineweb_val_000000.npy", np.arange(500, dtype=np.uint16))
    loader = dp.TokenShardLoader(tmp_path, batch_size=8, seq_len=T, shuffle=False)
    assert loader.files == [tmp_path / "edufineweb_train_000001.npy"]
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, T) and x[1, 0] == T and torch.equal(y[0], torch.arange(1, T + 1))
    assert loader.state_dict()["consumed_windows"] == 8
    (tmp_path / "x_train_000002.bin").write_bytes(np.array([20240520, 1, 999], "<i4").tobytes() + bytes(1020))
    with pytest.raises(dp.DataError, match=r"x_train_000002\.bin: truncated"):
        dp.TokenShardLoader(tmp_path, batch_size=8, seq_len=T)
    with pytest.raises(FileNotFoundError, match="No train shards"):
        dp.TokenShardLoader(tmp_path / "nothing", batch_size=8, seq_len=T)
    with pytest.raises(dp.DataError, match="fewer than one global batch"):
        dp.TokenShardLoader(f"{tmp_path}/*.npy", split="val", batch_size=64, seq_len=T)


def test_val_batches_fixed_budget_whatever_ranks_and_batch(synthetic):
    path, _ = synthetic
    val_tokens = 1000
    n = val_tokens // T

    def windows(batch_size, world_size):
        rows = []
        for rank in range(world_size):
            for x, y in dp.iter_val_batches(path, batch_size, T, val_tokens, rank, world_size):
                assert x.shape[0] <= batch_size and x.shape[1] == T and torch.equal(x[:, 1:], y[:, :-1])
                rows += [tuple(r) for r in x.tolist()]
        return rows

    expected = [tuple(range(30_000 + k * T, 30_000 + (k + 1) * T)) for k in range(n)]
    assert windows(64, 1) == expected
    for batch_size, world_size in [(7, 1), (2, 3), (5, 8), (64, 100)]:
        got = windows(batch_size, world_size)
        assert len(got) == n and sorted(got) == expected
    with pytest.raises(dp.DataError, match="5,000 tokens, fewer than the 6,001 needed"):
        next(dp.iter_val_batches(path, 4, T, 6000))


def test_val_windows_continue_across_val_shards(tmp_path):
    dp.write_shard(tmp_path / "v_val_000000.bin", np.arange(600))
    dp.write_shard(tmp_path / "v_val_000001.bin", np.arange(600, 2000))
    x = torch.cat([x for x, _ in dp.iter_val_batches(tmp_path, 8, T, 1600)])
    assert torch.equal(x.flatten(), torch.arange(1600))


# ---------------------------------------------------------------------------------------------------------------
# Streaming loader


def test_streaming_loader_packs_the_same_tokens_and_resumes_exactly(fineweb, gpt2_encoding):
    path, texts = fineweb
    ref = reference_tokens(gpt2_encoding, texts)
    B, L = 4, 32
    loader = dp.StreamingTokenLoader(str(path), batch_size=B, seq_len=L, batch_docs=8)
    per = B * L
    for i in range(3):
        x, y = loader.next_batch()
        assert x.shape == (B, L) and x.dtype == torch.int64
        assert x.flatten().tolist() == ref[i * per : (i + 1) * per].tolist()
        assert y.flatten().tolist() == ref[i * per + 1 : (i + 1) * per + 1].tolist()
    steps_per_epoch = len(ref) // per
    for _ in range(steps_per_epoch - 5):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(6)]  # crosses into epoch 1
    assert loader.epoch == 1
    resumed = dp.StreamingTokenLoader(str(path), batch_size=B, seq_len=L, batch_docs=8)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for ex, got in zip(expected, (resumed.next_batch() for _ in range(6)), strict=True):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])


def test_streaming_loader_ranks_read_disjoint_files(gpt2_encoding, fineweb, tmp_path):
    _, texts = fineweb
    docs = [t for t in texts if t and t.strip()]
    for i in range(2):
        write_fineweb_parquet(tmp_path / f"part_{i}.parquet", docs[i * 150 : (i + 1) * 150])
    seen = []
    for rank in range(2):
        loader = dp.StreamingTokenLoader(f"{tmp_path}/*.parquet", batch_size=2, seq_len=64, rank=rank, world_size=2)
        seen.append({tuple(r) for _ in range(20) for r in loader.next_batch()[0].tolist()})
    assert not seen[0] & seen[1]
