"""data/stream_loader.py: batches cut from a text stream equal those of shards made of it; processes, resume, read
errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from gpt2_repro.base.errors import DataError
from gpt2_repro.data import prepare as data_prep
from gpt2_repro.data.shard_loader import TokenShardLoader
from gpt2_repro.data.shards import find_shards, read_shard
from gpt2_repro.data.stream_loader import StreamingTokenLoader, StreamSpec
from synthetic import FlakyReads, reference_tokens, reference_windows

VAL, SHARD, SEQ = 2048, 1000, 32  # the stream's validation tokens, shard tokens, seq_len


def stream_loader(folder, **kw) -> StreamingTokenLoader:
    """The loader of the local stream `folder`: the stream's settings (StreamSpec's fields) and the loader's in `kw`."""
    kw = {"batch_size": 4, "seq_len": SEQ, "val_tokens": VAL, "shard_tokens": SHARD, "batch_docs": 4, **kw}
    spec = {k: kw.pop(k) for k in [f.name for f in dataclasses.fields(StreamSpec)] if k in kw}
    return StreamingTokenLoader(StreamSpec(str(folder), **spec), **kw)


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
        dataset=str(folder), output_dir=str(tmp_path), val_tokens=VAL, shard_tokens=SHARD, progress=False
    )
    data_prep.prepare(prep)
    sharded = TokenShardLoader(tmp_path, batch_size=4, seq_len=SEQ, shuffle=False)
    streamed = stream_loader(folder, keep_val_tokens=VAL + 1)  # the val shard: VAL scored targets, VAL + 1 tokens
    batches = 2 * sharded.windows_per_epoch // 4 + 3  # into the third epoch; batches straddle epochs
    for i in range(batches):
        a, b = sharded.next_batch(), streamed.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"batch {i}"
    assert streamed.epoch == 2
    val_shard = np.asarray(read_shard(find_shards(tmp_path, "val")[0]))
    assert np.array_equal(streamed.validation_tokens, val_shard)
    assert np.array_equal(val_shard, reference_tokens(gpt2_encoding, texts)[: VAL + 1])
    streamed.close()


@pytest.mark.parametrize("world_size", [2, 3])
def test_stream_processes_read_disjoint_documents_and_skip_none(gpt2_encoding, stream_files, world_size):
    """Each process: every world_size-th document after the validation tokens, cut into its own windows."""
    folder, texts = stream_files
    for rank in range(world_size):
        expected = reference_windows(gpt2_encoding, texts, VAL, SHARD, SEQ, rank, world_size)
        loader = stream_loader(folder, batch_size=1, rank=rank, world_size=world_size)
        assert np.array_equal(served_windows(loader, len(expected)), expected), rank
        assert loader.epoch == 1  # and nothing more in the first epoch
        loader.close()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.slow
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
    if shuffle:  # a permutation of each block of the unshuffled order: same windows per epoch, other order
        plain = served_windows(stream_loader(folder), 60)
        assert not np.array_equal(plain, whole)
        per_epoch = len(reference_windows_of(folder))
        epoch = lambda w: sorted(map(bytes, w[:per_epoch]))
        assert epoch(plain) == epoch(whole)
    with pytest.raises(DataError, match="seed: 7 saved, 8 now"):
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


@pytest.mark.slow
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
        with pytest.raises(DataError, match="failed 2 times in a row.*--resume latest"):
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
    with pytest.raises(DataError, match="nothing would be left to train on"):
        stream_loader(folder, val_tokens=10**6).next_batch()


def test_a_read_error_that_retrying_cannot_mend_is_not_told_to_wait():
    """The advice after a read error: resume once the network is back, or fix the data (no waiting helps)."""
    from gpt2_repro.base.errors import StreamReadError
    from gpt2_repro.data.stream_loader import _resumable

    network = _resumable(StreamReadError("Reading the dataset failed 9 times in a row"))
    data = _resumable(StreamReadError("Reading the dataset failed: ArrowInvalid: bad page", transient=False))
    assert "Once it can be read again, continue with --resume latest" in str(network)
    assert "Retrying cannot mend this" in str(data) and "Once it can be read again" not in str(data)
