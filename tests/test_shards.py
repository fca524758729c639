"""data/shards.py: the shard format, SHA-256 verification against manifest.json, the data fingerprint."""

import hashlib
import json

import numpy as np
import pytest

from gpt2_repro.base.errors import DataError
from gpt2_repro.data.shard_loader import TokenShardLoader
from gpt2_repro.data.shards import MANIFEST, check_shards, data_fingerprint, read_shard, verify_shards, write_shard


def test_shard_header_layout_and_roundtrip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 42], dtype=np.int64)
    sha = write_shard(tmp_path / "x_train_000001.bin", tokens)
    raw = (tmp_path / "x_train_000001.bin").read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert sha == hashlib.sha256(raw).hexdigest()
    back = read_shard(tmp_path / "x_train_000001.bin")
    assert back.dtype == np.uint16 and back.tolist() == tokens.tolist()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "bad.bin", np.array([70000]))


def test_verify_shards_checks_presence_size_and_sha256(tmp_path):
    shards = []
    for i, n in enumerate((300, 500, 700)):
        name = f"d_{'val' if i == 0 else 'train'}_{i:06d}.bin"
        sha = write_shard(tmp_path / name, np.arange(n) % 50000)
        shards.append({"file": name, "tokens": n, "sha256": sha})
    assert verify_shards(tmp_path) is None  # no manifest: nothing to check against
    (tmp_path / MANIFEST).write_text(json.dumps({"shards": shards}))
    assert verify_shards(tmp_path) == [] and check_shards(tmp_path) is True
    flipped = tmp_path / shards[1]["file"]
    raw = bytearray(flipped.read_bytes())
    raw[1024 + 333] ^= 0x01  # one bit of one token: the size and the header stay valid
    flipped.write_bytes(raw)
    (tmp_path / shards[2]["file"]).unlink()
    problems = verify_shards(tmp_path, threads=2)
    assert len(problems) == 2
    assert shards[1]["file"] in problems[0] and "SHA-256 differs" in problems[0]
    assert shards[2]["file"] in problems[1] and "missing" in problems[1]
    with pytest.raises(DataError, match=r"2 shard\(s\) do not match manifest.json.*data_prep.py"):
        check_shards(tmp_path)


def test_data_fingerprint_is_what_the_loader_saves(tmp_path):
    write_shard(tmp_path / "d_train_000001.bin", np.arange(1000))
    write_shard(tmp_path / "d_train_000002.bin", np.arange(900))
    loader = TokenShardLoader(tmp_path, batch_size=2, seq_len=16)
    assert data_fingerprint(tmp_path) == loader.state_dict()["shards"]
    write_shard(tmp_path / "d_train_000002.bin", np.arange(901))
    assert data_fingerprint(tmp_path) != loader.state_dict()["shards"]


def test_read_shard_names_file_and_problem(tmp_path):
    good = tmp_path / "a_train_000001.bin"
    write_shard(good, np.arange(100))
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
        with pytest.raises(DataError, match=message) as e:
            read_shard(path)
        assert str(path) in str(e.value)
    np.save(tmp_path / "f32.npy", np.zeros(10, np.float32))
    with pytest.raises(DataError, match="1-D uint16"):
        read_shard(tmp_path / "f32.npy")
    with pytest.raises(FileNotFoundError):
        read_shard(tmp_path / "absent.bin")
