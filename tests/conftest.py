"""Shared fixtures. Tests need no files outside the repository: the GPT-2 vocabulary comes from tiktoken's normal loader
(TIKTOKEN_CACHE_DIR, GPT2_REPRO_VOCAB, or a download), and tests that need it skip only when none works.

The suite runs in parallel processes (pytest-xdist, `-n auto` in pyproject.toml): each process computes with one
torch thread, and the expensive fixtures (generated data, the reference training runs) are made once for all of
them (`shared_folder`).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # test processes sharing the cores
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)  # the same share for the processes the tests start

from gpt2_repro.data.shards import write_shard  # noqa: E402  (the repository's root is on sys.path now)
from runs import MUON_ARGS, shared_folder, shared_run  # noqa: E402
from synthetic import hellaswag_examples, learnable_tokens, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_encoding():
    """tiktoken's GPT-2 BPE; skips the test when the vocabulary can neither be found locally nor downloaded."""
    from gpt2_repro.data.tokenizer import get_gpt2_encoding

    try:
        return get_gpt2_encoding()
    except RuntimeError as e:
        pytest.skip(f"GPT-2 vocabulary unreachable (offline, no TIKTOKEN_CACHE_DIR): {e}")


@pytest.fixture(scope="session")
def fineweb(tmp_path_factory):
    """(parquet path, its texts): 400 generated documents plus empty, whitespace-only and null ones."""
    from synthetic import make_texts, write_fineweb_parquet

    texts = make_texts(400, seed=0)
    texts[3], texts[50], texts[120] = "", "   \n ", None
    folder = shared_folder(
        tmp_path_factory, "fineweb", lambda f: write_fineweb_parquet(f / "fineweb_sample.parquet", texts)
    )
    return folder / "fineweb_sample.parquet", texts


@pytest.fixture(scope="session")
def stream_files(tmp_path_factory):
    """(folder of 25 parquet files of 5 short documents, the documents): a multi-file stream (like the Hub's) of
    about 5,500 tokens, with empty, whitespace-only and null documents."""
    from synthetic import make_texts, write_fineweb_parquet

    texts = make_texts(125, seed=5, words=(5, 60))
    texts[7], texts[30], texts[61] = "", None, " \n"

    def make(folder):
        for i in range(25):
            write_fineweb_parquet(folder / f"part_{i:03d}.parquet", texts[i * 5 : (i + 1) * 5])

    return shared_folder(tmp_path_factory, "stream", make), texts


@pytest.fixture(scope="session")
def hf_tokenizer(gpt2_encoding):
    from gpt2_repro.data.tokenizer import build_hf_tokenizer

    return build_hf_tokenizer(gpt2_encoding)


def pytest_collection_modifyitems(config, items):
    # Longest first: training runs, then the other slow tests, then the unit tests. With --dist worksteal each worker
    # starts on its share of this list and an idle worker takes tests from the end of a busy one's queue, so the last
    # tests to run are short ones and the workers finish together.
    items.sort(key=lambda item: ("slow" not in item.keywords, not item.path.name.startswith("test_train")))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repro():
    """synthetic.tiny_repro(): a 2-layer GPT-2 of ours, seeded."""
    from synthetic import tiny_repro

    return tiny_repro()


@pytest.fixture(scope="session")
def val_dir(tmp_path_factory):
    """A val shard of SEQ_LEN * VAL_WINDOWS + 1 GPT-2 ids (synthetic's constants), written by shards.write_shard."""
    import numpy as np

    from gpt2_repro.data.shards import write_shard
    from synthetic import SEQ_LEN, VAL_WINDOWS

    folder = tmp_path_factory.mktemp("shards")
    tokens = np.random.default_rng(0).integers(0, 50257, SEQ_LEN * VAL_WINDOWS + 1, dtype=np.uint16)
    write_shard(folder / "test_val_000000.bin", tokens)
    return folder


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder this process cannot write: chmod 555, or for root (whom chmod does not stop) a read-only tmpfs."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root and cannot mount a read-only tmpfs: no read-only folder to test")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


# ------------------------------------------------------------------- data and runs that several test files read


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, gpt2_encoding):
    """Train/val shards of structured token ids (a random Markov chain over 200 GPT-2 ids: learnable)."""

    def make(folder):
        tokens = learnable_tokens(30000)
        write_shard(folder / "test_val_000000.bin", tokens[:4096])
        write_shard(folder / "test_train_000001.bin", tokens[4096:])

    return shared_folder(tmp_path_factory, "shards", make)


@pytest.fixture(scope="session")
def hellaswag_file(tmp_path_factory):
    folder = shared_folder(
        tmp_path_factory, "hellaswag", lambda f: write_jsonl(f / "hellaswag_val.jsonl", hellaswag_examples(6))
    )
    return folder / "hellaswag_val.jsonl"


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir, hellaswag_file):
    """One uninterrupted single-process run: MAX_STEPS optimizer steps of 2 x 4 x 32 tokens, under umask 002 (a
    group's shared folder)."""
    return shared_run(
        tmp_path_factory,
        "reference",
        ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)],
        umask=0o002,
    )


@pytest.fixture(scope="session")
def muon_reference(tmp_path_factory, data_dir, hellaswag_file):
    """One uninterrupted single-process run of the fast recipe, like `reference`."""
    args = [*MUON_ARGS, "--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)]
    return shared_run(tmp_path_factory, "muon_reference", args)
