"""The GPT-2 BPE: tiktoken encoding, local vocabularies, and the Hugging Face tokenizer built from it."""

import hashlib
import random

import pytest
import tiktoken.load
from transformers import AutoTokenizer

from gpt2_repro.data import tokenizer as gpt2_tokenizer
from gpt2_repro.data.tokenizer import EOT_ID, R50K_URL, build_hf_tokenizer, get_gpt2_encoding

SAMPLES = [
    "Hello world",
    "Hello, I'm a language model,",
    "  leading spaces, trailing spaces   ",
    "they'll've we're it's I'd DON'T",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n",
    "naïve café, Straße, 日本語のテキスト, emoji 🎉🤖, math ∑∫√",
    "numbers 1234567 3.14159 1e-8 0x1F",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "a" * 300,
    "",
]


def random_texts(n=200, seed=0):
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFG  \n\t.,;:'\"!?-()[]{}0123456789éüß中文日本한국어🎉"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(n)]


def test_encoding_is_gpt2(gpt2_encoding):
    assert gpt2_encoding.n_vocab == 50257
    assert gpt2_encoding.eot_token == EOT_ID == 50256
    assert gpt2_encoding.encode("Hello world") == [15496, 995]
    assert gpt2_encoding.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_hf_tokenizer_gives_tiktoken_ids(gpt2_encoding, hf_tokenizer):
    for text in SAMPLES + random_texts():
        expected = gpt2_encoding.encode_ordinary(text)
        assert hf_tokenizer(text)["input_ids"] == expected, text
        assert hf_tokenizer.decode(expected) == text
    assert hf_tokenizer("<|endoftext|>")["input_ids"] == [EOT_ID]
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == EOT_ID
    assert len(hf_tokenizer) == 50257


def test_saved_tokenizer_loads_with_autotokenizer(tmp_path, gpt2_encoding, hf_tokenizer):
    hf_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert loaded(text)["input_ids"] == gpt2_encoding.encode_ordinary(text)
    assert loaded.model_max_length == 1024


def _write_vocab(path, gpt2_encoding):
    """The r50k_base file format: one 'base64(token) rank' line per mergeable token."""
    import base64

    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in gpt2_encoding._mergeable_ranks.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_local_vocabulary_file_folder_and_env(tmp_path, monkeypatch, gpt2_encoding):
    vocab = _write_vocab(tmp_path / "r50k_base.tiktoken", gpt2_encoding)
    text = SAMPLES[5] + SAMPLES[4]
    expected = gpt2_encoding.encode_ordinary(text)
    assert get_gpt2_encoding(vocab).encode_ordinary(text) == expected
    assert get_gpt2_encoding(str(tmp_path)).encode_ordinary(text) == expected  # a folder holding it
    cache = tmp_path / "cache"  # a tiktoken cache names the file by the SHA-1 of its URL
    cache.mkdir()
    (cache / hashlib.sha1(R50K_URL.encode()).hexdigest()).write_bytes(vocab.read_bytes())
    monkeypatch.setenv("GPT2_REPRO_VOCAB", str(cache))
    enc = get_gpt2_encoding()
    assert enc.encode_ordinary(text) == expected and enc.eot_token == EOT_ID
    assert build_hf_tokenizer(enc)(text)["input_ids"] == expected


def test_bad_vocabulary_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        get_gpt2_encoding(tmp_path / "missing.tiktoken")
    with pytest.raises(FileNotFoundError, match="No GPT-2 vocabulary in folder"):
        get_gpt2_encoding(tmp_path)
    wrong = tmp_path / "other.tiktoken"
    wrong.write_text("YQ== 0\nYg== 1\n")
    with pytest.raises(ValueError, match="is not the GPT-2 vocabulary"):
        get_gpt2_encoding(wrong)


def test_offline_without_cache_explains_the_fix(tmp_path, monkeypatch):
    def no_network(url):  # the network boundary: what tiktoken's downloader does without internet
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("GPT2_REPRO_VOCAB", raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget the encoding loaded by other tests
    gpt2_tokenizer._load_encoding.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR.*GPT2_REPRO_VOCAB"):
            get_gpt2_encoding()
    finally:
        gpt2_tokenizer._load_encoding.cache_clear()


def test_the_built_tokenizer_is_cached_and_a_damaged_cache_is_no_error(tmp_path, monkeypatch, gpt2_encoding):
    """The first build writes the backend to the user cache, later ones read it (a change made to the cached file
    shows); a damaged cache file is rebuilt."""
    import json

    monkeypatch.setenv("GPT2_REPRO_CACHE", str(tmp_path / "cache"))
    text = SAMPLES[1] + SAMPLES[5]
    expected = gpt2_encoding.encode_ordinary(text)
    built = build_hf_tokenizer(gpt2_encoding)
    (cached,) = (tmp_path / "cache" / "tokenizer").iterdir()
    first = cached.read_text()
    again = build_hf_tokenizer(gpt2_encoding)
    assert again.backend_tokenizer.to_str() == built.backend_tokenizer.to_str() and again(text)["input_ids"] == expected

    marked = json.loads(cached.read_text()) | {"normalizer": {"type": "Lowercase"}}
    cached.write_text(json.dumps(marked))
    assert build_hf_tokenizer(gpt2_encoding)(text)["input_ids"] == gpt2_encoding.encode_ordinary(text.lower())

    cached.write_text(cached.read_text()[:1000])  # cut short, as by a full disk
    assert build_hf_tokenizer(gpt2_encoding)(text)["input_ids"] == expected
    assert cached.read_text() == first


def test_an_unwritable_tokenizer_cache_only_means_building_every_time(monkeypatch, gpt2_encoding, readonly_dir):
    monkeypatch.setenv("GPT2_REPRO_CACHE", str(readonly_dir))
    text = SAMPLES[1] + SAMPLES[5]
    assert build_hf_tokenizer(gpt2_encoding)(text)["input_ids"] == gpt2_encoding.encode_ordinary(text)
    assert not list(readonly_dir.iterdir())
