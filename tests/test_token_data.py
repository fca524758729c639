"""token_data.py: the shard format, the training loader, the validation batches and the streaming loader.

Loader tests use synthetic shards whose token values are their positions (so a window's first token says which
shard and offset it came from); streaming tests use FineWeb-shaped parquet files of generated text, prepared into
shards by data_prep.py where a streamed loader must serve what the shards serve.
"""

import hashlib
import json

import numpy as np
import pytest
import torch

import data_prep
import token_data as td
from synthetic import FlakyReads, reference_tokens, reference_windows

# ---------------------------------------------------------------------------------------------------------------
# Shard files


def test_shard_header_layout_and_roundtrip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 42], dtype=np.int64)
    sha = td.write_shard(tmp_path / "x_train_000001.bin", tokens)
    raw = (tmp_path / "x_train_000001.bin").read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert sha == hashlib.sha256(raw).hexdigest()
    back = td.read_shard(tmp_path / "x_train_000001.bin")
    assert back.dtype == np.uint16 and back.tolist() == tokens.tolist()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="uint16"):
        td.write_shard(tmp_path / "bad.bin", np.array([70000]))


def test_verify_shards_checks_presence_size_and_sha256(tmp_path):
    shards = []
    for i, n in enumerate((300, 500, 700)):
        name = f"d_{'val' if i == 0 else 'train'}_{i:06d}.bin"
        sha = td.write_shard(tmp_path / name, np.arange(n) % 50000)
        shards.append({"file": name, "tokens": n, "sha256": sha})
    assert td.verify_shards(tmp_path) is None  # no manifest: nothing to check against
    (tmp_path / td.MANIFEST).write_text(json.dumps({"shards": shards}))
    assert td.verify_shards(tmp_path) == [] and td.check_shards(tmp_path) is True
    flipped = tmp_path / shards[1]["file"]
    raw = bytearray(flipped.read_bytes())
    raw[1024 + 333] ^= 0x01  # one bit of one token: the size and the header stay valid
    flipped.write_bytes(raw)
    (tmp_path / shards[2]["file"]).unlink()
    problems = td.verify_shards(tmp_path, threads=2)
    assert len(problems) == 2
    assert shards[1]["file"] in problems[0] and "SHA-256 differs" in problems[0]
    assert shards[2]["file"] in problems[1] and "missing" in problems[1]
    with pytest.raises(
        td.DataError, match=r"2 shard\(s\) do not match manifest.json.*data_prep.py"
    ):
        td.check_shards(tmp_path)


def test_data_fingerprint_is_what_the_loader_saves(tmp_path):
    td.write_shard(tmp_path / "d_train_000001.bin", np.arange(1000))
    td.write_shard(tmp_path / "d_train_000002.bin", np.arange(900))
    loader = td.TokenShardLoader(tmp_path, batch_size=2, seq_len=16)
    assert td.data_fingerprint(tmp_path) == loader.state_dict()["shards"]
    td.write_shard(tmp_path / "d_train_000002.bin", np.arange(901))
    assert td.data_fingerprint(tmp_path) != loader.state_dict()["shards"]


def test_read_shard_names_file_and_problem(tmp_path):
    good = tmp_path / "a_train_000001.bin"
    td.write_shard(good, np.arange(100))
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
        with pytest.raises(td.DataError, match=message) as e:
            td.read_shard(path)
        assert str(path) in str(e.value)
    np.save(tmp_path / "f32.npy", np.zeros(10, np.float32))
    with pytest.raises(td.DataError, match="1-D uint16"):
        td.read_shard(tmp_path / "f32.npy")
    with pytest.raises(FileNotFoundError):
        td.read_shard(tmp_path / "absent.bin")


# ---------------------------------------------------------------------------------------------------------------
# Training loader, on synthetic shards whose token values are positions

LENGTHS = [1000, 1537, 700, 2050]
T = 16


@pytest.fixture
def synthetic(tmp_path):
    """Four train shards; shard s holds values base_s + arange(n_s), with gaps so no window can span two shards."""
    bases = np.cumsum([0] + [n + 100 for n in LENGTHS[:-1]])
    for s, (base, n) in enumerate(zip(bases, LENGTHS, strict=True)):
        td.write_shard(tmp_path / f"syn_train_{s + 1:06d}.bin", base + np.arange(n))
    td.write_shard(tmp_path / "syn_val_000000.bin", np.arange(5000) + 30_000)
    return tmp_path, bases


def window_starts(x: torch.Tensor, y: torch.Tensor) -> list[int]:
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(
        x, x[:, :1] + torch.arange(x.shape[1])
    )  # contiguous: never spans a shard boundary
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    return x[:, 0].tolist()


def stream(loaders, steps) -> list[int]:
    """First tokens of windows in global order: step by step, rank by rank."""
    return [
        s for _ in range(steps) for loader in loaders for s in window_starts(*loader.next_batch())
    ]


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
    loaders = [
        td.TokenShardLoader(path, "train", batch_size, T, r, world_size, seed=7)
        for r in range(world_size)
    ]
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
        loader = td.TokenShardLoader(path, batch_size=1, seq_len=T, seed=seed, shuffle=shuffle)
        return [stream([loader], W) for _ in range(n)]

    a, b = epochs(1, True), epochs(1, True)
    assert a == b and a[0] != a[1] and epochs(2, True)[0] != a[0]
    shard_order = lambda starts: list(
        dict.fromkeys(np.searchsorted(bases, starts, side="right") - 1)
    )
    orders = [shard_order(e) for e in epochs(1, True, 6)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len({tuple(o) for o in orders}) > 1
    plain = epochs(0, False)
    expected = [b + k * T for b, n in zip(bases, LENGTHS, strict=True) for k in range((n - 1) // T)]
    assert plain[0] == plain[1] == expected


def test_loader_resume_is_exact_and_survives_world_size_change(synthetic):
    path, _ = synthetic

    def make(rank, world, bs=4):
        return td.TokenShardLoader(
            path, batch_size=bs, seq_len=T, rank=rank, world_size=world, seed=3
        )

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
        td.TokenShardLoader(path, batch_size=4, seq_len=T, seed=4).load_state_dict(state)


def test_loader_reads_build_nanogpt_npy_and_rejects_bad_shards(tmp_path):
    np.save(tmp_path / "edufineweb_train_000001.npy", np.arange(3000, dtype=np.uint16))
    np.save(tmp_path / "edufineweb_val_000000.npy", np.arange(500, dtype=np.uint16))
    loader = td.TokenShardLoader(tmp_path, batch_size=8, seq_len=T, shuffle=False)
    assert loader.files == [tmp_path / "edufineweb_train_000001.npy"]
    x, y = loader.next_batch()
    assert (
        x.shape == y.shape == (8, T) and x[1, 0] == T and torch.equal(y[0], torch.arange(1, T + 1))
    )
    assert loader.state_dict()["consumed_windows"] == 8
    (tmp_path / "x_train_000002.bin").write_bytes(
        np.array([20240520, 1, 999], "<i4").tobytes() + bytes(1020)
    )
    with pytest.raises(td.DataError, match=r"x_train_000002\.bin: truncated"):
        td.TokenShardLoader(tmp_path, batch_size=8, seq_len=T)
    with pytest.raises(FileNotFoundError, match="No train shards"):
        td.TokenShardLoader(tmp_path / "nothing", batch_size=8, seq_len=T)
    with pytest.raises(td.DataError, match="fewer than one global batch"):
        td.TokenShardLoader(f"{tmp_path}/*.npy", split="val", batch_size=64, seq_len=T)


def test_val_batches_fixed_budget_whatever_ranks_and_batch(synthetic):
    path, _ = synthetic
    val_tokens = 1000
    n = val_tokens // T

    def windows(batch_size, world_size):
        rows = []
        for rank in range(world_size):
            for x, y in td.iter_val_batches(path, batch_size, T, val_tokens, rank, world_size):
                assert (
                    x.shape[0] <= batch_size
                    and x.shape[1] == T
                    and torch.equal(x[:, 1:], y[:, :-1])
                )
                rows += [tuple(r) for r in x.tolist()]
        return rows

    expected = [tuple(range(30_000 + k * T, 30_000 + (k + 1) * T)) for k in range(n)]
    assert windows(64, 1) == expected
    for batch_size, world_size in [(7, 1), (2, 3), (5, 8), (64, 100)]:
        got = windows(batch_size, world_size)
        assert len(got) == n and sorted(got) == expected
    with pytest.raises(td.DataError, match="5,000 tokens, fewer than the 6,001 needed"):
        next(td.iter_val_batches(path, 4, T, 6000))


def test_val_windows_continue_across_val_shards(tmp_path):
    td.write_shard(tmp_path / "v_val_000000.bin", np.arange(600))
    td.write_shard(tmp_path / "v_val_000001.bin", np.arange(600, 2000))
    x = torch.cat([x for x, _ in td.iter_val_batches(tmp_path, 8, T, 1600)])
    assert torch.equal(x.flatten(), torch.arange(1600))


# ---------------------------------------------------------------------------------------------------------------
# Streaming loader: a text stream cut like data_prep.py's shards

VAL, SHARD, SEQ = 2048, 1000, 32  # the stream's validation tokens, shard tokens, seq_len


def stream_loader(folder, **kw) -> td.StreamingTokenLoader:
    kw = {
        "batch_size": 4,
        "seq_len": SEQ,
        "val_tokens": VAL,
        "shard_tokens": SHARD,
        "batch_docs": 4,
        **kw,
    }
    return td.StreamingTokenLoader(str(folder), **kw)


def served_windows(loader, n_batches: int) -> np.ndarray:
    """(n_batches * B, SEQ+1): the windows behind the next n_batches batches."""
    out = [np.zeros((0, SEQ + 1), dtype=np.uint16)]
    for _ in range(n_batches):
        x, y = loader.next_batch()
        out.append(torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.uint16))
    return np.concatenate(out)


def test_stream_serves_what_shards_of_the_same_source_serve(gpt2_encoding, stream_files, tmp_path):
    """Shuffle off, one process: the batches of TokenShardLoader on data_prep.py's shards, over two epochs,
    and validation tokens equal to the val shard."""
    folder, texts = stream_files
    prep = data_prep.PrepConfig(
        dataset=str(folder),
        output_dir=str(tmp_path),
        val_tokens=VAL,
        shard_tokens=SHARD,
        progress=False,
    )
    data_prep.prepare(prep)
    sharded = td.TokenShardLoader(tmp_path, batch_size=4, seq_len=SEQ, shuffle=False)
    streamed = stream_loader(folder, keep_val_tokens=VAL)
    batches = (
        2 * sharded.windows_per_epoch // 4 + 3
    )  # into the third epoch; batches straddle epochs
    for i in range(batches):
        a, b = sharded.next_batch(), streamed.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"batch {i}"
    assert streamed.epoch == 2
    val_shard = np.asarray(td.read_shard(td.find_shards(tmp_path, "val")[0]))
    assert np.array_equal(streamed.validation_tokens, val_shard)
    assert np.array_equal(val_shard, reference_tokens(gpt2_encoding, texts)[:VAL])
    streamed.close()


@pytest.mark.parametrize("world_size", [2, 3])
def test_stream_processes_read_disjoint_documents_and_skip_none(
    gpt2_encoding, stream_files, world_size
):
    """Each process: every world_size-th document after the validation tokens, cut into its own windows."""
    folder, texts = stream_files
    for rank in range(world_size):
        expected = reference_windows(gpt2_encoding, texts, VAL, SHARD, SEQ, rank, world_size)
        loader = stream_loader(folder, batch_size=1, rank=rank, world_size=world_size)
        assert np.array_equal(served_windows(loader, len(expected)), expected), rank
        assert loader.epoch == 1  # and nothing more in the first epoch
        loader.close()


@pytest.mark.parametrize("shuffle", [False, True])
def test_stream_resume_is_exact_anywhere(stream_files, shuffle):
    """From a state_dict taken after k batches (JSON round trip), a new loader serves exactly what an
    uninterrupted one serves next: inside and at the end of shuffle blocks, shards and epochs."""
    folder, _ = stream_files
    kw = {"shuffle": shuffle, "shuffle_windows": 24, "seed": 7}
    whole = served_windows(stream_loader(folder, **kw), 60)  # 240 windows: 2+ epochs of ~100
    for k in (0, 5, 6, 26, 51):  # batches of 4, blocks of 24 windows, ~100 windows per epoch
        first = stream_loader(folder, **kw)
        served_windows(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        again = stream_loader(folder, **kw)
        again.load_state_dict(state)
        assert np.array_equal(served_windows(again, 60 - k), whole[4 * k :]), k
        again.close()
    if (
        shuffle
    ):  # a permutation of each block of the unshuffled order: same windows per epoch, other order
        plain = served_windows(stream_loader(folder), 60)
        assert not np.array_equal(plain, whole)
        per_epoch = len(reference_windows_of(folder))
        epoch = lambda w: sorted(map(bytes, w[:per_epoch]))
        assert epoch(plain) == epoch(whole)
    with pytest.raises(td.DataError, match="seed: 7 saved, 8 now"):
        stream_loader(folder, **{**kw, "seed": 8}).load_state_dict(state)


def reference_windows_of(folder) -> np.ndarray:
    """One epoch of the unshuffled windows (as served)."""
    loader = stream_loader(folder, batch_size=1)
    first = served_windows(loader, 1)
    rest = []
    while loader.epoch == 0:
        rest.append(served_windows(loader, 1))
    loader.close()
    return np.concatenate([first, *rest])


def test_stream_retries_transient_read_errors_and_stops_on_persistent_ones(stream_files):
    """Reads of one file fail (a stand-in for the network): twice -> retried, the same batches; always -> a
    DataError saying how to continue, and a resume from the last state once reads work serves the rest."""
    folder, _ = stream_files
    clean = served_windows(stream_loader(folder), 30)
    with FlakyReads("part_015", failures=2) as flaky:  # file 15: well after the validation tokens
        assert np.array_equal(served_windows(stream_loader(folder), 30), clean)
    assert flaky.failed == 2
    with FlakyReads("part_015", failures=10**9):
        loader, states = stream_loader(folder, retries=1), []
        with pytest.raises(td.DataError, match="failed 2 times in a row.*--resume latest"):
            while True:
                states.append(loader.state_dict())
                loader.next_batch()
    done = len(states) - 1
    assert 3 <= done < 30, "the failure was not in the middle of the stream"
    resumed = stream_loader(folder)
    resumed.load_state_dict(json.loads(json.dumps(states[-1])))
    assert np.array_equal(served_windows(resumed, 30 - done), clean[4 * done :])


def test_stream_that_is_all_validation_is_refused(stream_files):
    folder, _ = stream_files
    with pytest.raises(td.DataError, match="nothing would be left to train on"):
        stream_loader(folder, val_tokens=10**6).next_batch()
