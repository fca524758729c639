"""Shared fixtures. Tests never need ../shared: the GPT-2 vocabulary comes from tiktoken's normal loader
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
