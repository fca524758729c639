"""data/shard_loader.py and data/windows.py: the training loader and the validation batches.

The tests use synthetic shards whose token values are their positions (so a window's first token says which shard
and offset it came from).
"""

import json

import numpy as np
import pytest
import torch

from gpt2_repro.base.errors import DataError
from gpt2_repro.data.shard_loader import TokenShardLoader
from gpt2_repro.data.shards import write_shard
from gpt2_repro.data.windows import iter_val_batches

# ---------------------------------------------------------------------------------------------------------------
# Shard files


# ---------------------------------------------------------------------------------------------------------------
# Training loader, on synthetic shards whose token values are positions

LENGTHS = [1000, 1537, 700, 2050]
T = 16


@pytest.fixture
def synthetic(tmp_path):
    """Four train shards; shard s holds values base_s + arange(n_s), with gaps so no window can span two shards."""
    bases = np.cumsum([0] + [n + 100 for n in LENGTHS[:-1]])
    for s, (base, n) in enumerate(zip(bases, LENGTHS, strict=True)):
        write_shard(tmp_path / f"syn_train_{s + 1:06d}.bin", base + np.arange(n))
    write_shard(tmp_path / "syn_val_000000.bin", np.arange(5000) + 30_000)
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
    loaders = [TokenShardLoader(path, "train", batch_size, T, r, world_size, seed=7) for r in range(world_size)]
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
        loader = TokenShardLoader(path, batch_size=1, seq_len=T, seed=seed, shuffle=shuffle)
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
        return TokenShardLoader(path, batch_size=bs, seq_len=T, rank=rank, world_size=world, seed=3)

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
        TokenShardLoader(path, batch_size=4, seq_len=T, seed=4).load_state_dict(state)


def test_loader_reads_build_nanogpt_npy_and_rejects_bad_shards(tmp_path):
    np.save(tmp_path / "edufineweb_train_000001.npy", np.arange(3000, dtype=np.uint16))
    np.save(tmp_path / "edufineweb_val_000000.npy", np.arange(500, dtype=np.uint16))
    loader = TokenShardLoader(tmp_path, batch_size=8, seq_len=T, shuffle=False)
    assert loader.files == [tmp_path / "edufineweb_train_000001.npy"]
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, T) and x[1, 0] == T and torch.equal(y[0], torch.arange(1, T + 1))
    assert loader.state_dict()["consumed_windows"] == 8
    (tmp_path / "x_train_000002.bin").write_bytes(np.array([20240520, 1, 999], "<i4").tobytes() + bytes(1020))
    with pytest.raises(DataError, match=r"x_train_000002\.bin: truncated"):
        TokenShardLoader(tmp_path, batch_size=8, seq_len=T)
    with pytest.raises(FileNotFoundError, match="No train shards"):
        TokenShardLoader(tmp_path / "nothing", batch_size=8, seq_len=T)
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenShardLoader(f"{tmp_path}/*.npy", split="val", batch_size=64, seq_len=T)


def test_val_batches_fixed_budget_whatever_ranks_and_batch(synthetic):
    path, _ = synthetic
    val_tokens = 1000
    n = val_tokens // T

    def windows(batch_size, world_size):
        rows = []
        for rank in range(world_size):
            for x, y in iter_val_batches(path, batch_size, T, val_tokens, rank, world_size):
                assert x.shape[0] <= batch_size and x.shape[1] == T and torch.equal(x[:, 1:], y[:, :-1])
                rows += [tuple(r) for r in x.tolist()]
        return rows

    expected = [tuple(range(30_000 + k * T, 30_000 + (k + 1) * T)) for k in range(n)]
    assert windows(64, 1) == expected
    for batch_size, world_size in [(7, 1), (2, 3), (5, 8), (64, 100)]:
        got = windows(batch_size, world_size)
        assert len(got) == n and sorted(got) == expected
    with pytest.raises(DataError, match="5,000 tokens, fewer than the 6,001 needed"):
        next(iter_val_batches(path, 4, T, 6000))


def test_val_windows_continue_across_val_shards(tmp_path):
    write_shard(tmp_path / "v_val_000000.bin", np.arange(600))
    write_shard(tmp_path / "v_val_000001.bin", np.arange(600, 2000))
    x = torch.cat([x for x, _ in iter_val_batches(tmp_path, 8, T, 1600)])
    assert torch.equal(x.flatten(), torch.arange(1600))
