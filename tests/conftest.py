"""Shared fixtures. Tests need no files outside the repository: the GPT-2 vocabulary comes from tiktoken's normal loader
(TIKTOKEN_CACHE_DIR, GPT2_REPRO_VOCAB, or a download), and tests that need it skip only when none works."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def gpt2_encoding():
    """tiktoken's GPT-2 BPE; skips the test when the vocabulary can neither be found locally nor downloaded."""
    from gpt2_tokenizer import get_gpt2_encoding

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
    path = write_fineweb_parquet(
        tmp_path_factory.mktemp("fineweb") / "fineweb_sample.parquet", texts
    )
    return path, texts


@pytest.fixture(scope="session")
def stream_files(tmp_path_factory):
    """(folder of 25 parquet files of 5 short documents, the documents): a multi-file stream (like the Hub's) of
    about 5,500 tokens, with empty, whitespace-only and null documents."""
    from synthetic import make_texts, write_fineweb_parquet

    folder = tmp_path_factory.mktemp("stream")
    texts = make_texts(125, seed=5, words=(5, 60))
    texts[7], texts[30], texts[61] = "", None, " \n"
    for i in range(25):
        write_fineweb_parquet(folder / f"part_{i:03d}.parquet", texts[i * 5 : (i + 1) * 5])
    return folder, texts


@pytest.fixture(scope="session")
def hf_tokenizer(gpt2_encoding):
    from gpt2_tokenizer import build_hf_tokenizer

    return build_hf_tokenizer(gpt2_encoding)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
