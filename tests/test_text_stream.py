"""data/text_stream.py: documents to GPT-2 tokens (EOT before each, empty documents skipped), the shard cut, reads."""

import numpy as np
import pytest

from gpt2_repro.data.shards import shard_capacity
from gpt2_repro.data.text_stream import (
    EncodedBatch,
    cut_shards,
    encode_documents,
    is_transient,
    open_text_stream,
    read_stream_head,
    retry_delay,
)
from synthetic import EOT, make_texts, reference_tokens, write_fineweb_parquet


def test_encode_documents_delimits_and_skips(gpt2_encoding):
    texts = ["hello world", "", None, 42, " ", "a <|endoftext|> b", "lone \ud800 surrogate"]
    tokens, doc_tokens = encode_documents(gpt2_encoding, texts)
    fixed = "lone \ud800 surrogate".encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    expected = reference_tokens(gpt2_encoding, ["hello world", "a <|endoftext|> b", fixed])
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected.tolist()
    assert int((tokens == EOT).sum()) == 3  # the literal "<|endoftext|>" text is ordinary tokens
    assert (doc_tokens == 0).tolist() == [False, True, True, True, True, False, False]


@pytest.mark.parametrize("literal", [False, True])
def test_one_call_per_batch_gives_one_call_per_document(gpt2_encoding, literal):
    """The batch is encoded in one call when no document holds the literal end-of-text text (else one call
    per document): the same tokens and per-document counts as tiktoken document by document."""
    texts = make_texts(200, seed=2)
    texts = texts if literal else [t.replace("<|endoftext|>", "<|eot|>") for t in texts]
    texts[10:12] = ["", "  \n"]
    assert any("<|endoftext|>" in t for t in texts) == literal
    tokens, doc_tokens = encode_documents(gpt2_encoding, texts)
    per_doc = [reference_tokens(gpt2_encoding, [t]) for t in texts]
    assert np.array_equal(tokens, np.concatenate(per_doc))
    assert doc_tokens.tolist() == [len(d) for d in per_doc]


def test_stream_head_is_the_val_shard_and_says_where_training_starts(gpt2_encoding, tmp_path):
    texts = make_texts(60, seed=4)
    texts[20] = ""
    ds = open_text_stream(str(write_fineweb_parquet(tmp_path / "x.parquet", texts))).dataset
    ref = reference_tokens(gpt2_encoding, texts)
    lengths = [len(reference_tokens(gpt2_encoding, [t])) for t in texts]
    ends = np.cumsum(lengths)
    for n in (1, 500, int(ends[19]), int(ends[19]) + 1, len(ref) - 1):  # mid-document and at its end
        head, (row, offset), skipped = read_stream_head(ds, "text", gpt2_encoding, n, batch_docs=7)
        assert skipped == (row > 20)  # the empty document 20, once the head reaches past it
        assert np.array_equal(head, ref[:n])
        before = int(ends[row - 1]) if row else 0
        assert 0 <= offset < lengths[row] and before + offset == n, (n, row, offset)
    head, end, _ = read_stream_head(ds, "text", gpt2_encoding, len(ref), keep=10)
    assert end == (60, 0) and np.array_equal(head, ref[:10])  # training would start after the end
    head, end, _ = read_stream_head(ds, "text", gpt2_encoding, len(ref) + 1)
    assert end is None and np.array_equal(head, ref)  # the stream is shorter than asked


def test_cut_shards_is_data_preps_layout_and_continues_inside_a_stream():
    ends = (7, 14, 20)  # three batches of tokens 0..19
    batches = [
        EncodedBatch(None, np.arange(a, b, dtype=np.uint16), np.ones(1)) for a, b in zip((0, *ends), ends, strict=False)
    ]

    def cut(max_tokens=None, **resume):
        size = lambda i: shard_capacity(i, val_tokens=5, shard_tokens=4, max_tokens=max_tokens)
        shards, ended = {}, []
        for piece in cut_shards(iter(batches), size, **resume):
            shards.setdefault(piece.shard, []).extend(piece.tokens.tolist())
            ended += [piece.shard] if piece.shard_end else []
        return shards, ended

    shards, ended = cut()  # val_tokens 5: a validation shard of 5 + 1 tokens (5 scored targets)
    assert shards == {0: [0, 1, 2, 3, 4, 5], 1: [6, 7, 8, 9], 2: [10, 11, 12, 13], 3: [14, 15, 16, 17], 4: [18, 19]}
    assert ended == [0, 1, 2, 3]  # the stream's last shard ends short
    assert cut(max_tokens=15) == ({0: [0, 1, 2, 3, 4, 5], 1: [6, 7, 8, 9], 2: [10, 11, 12, 13], 3: [14]}, [0, 1, 2, 3])
    later, ended = cut(shard=2, filled=1, skip=11)  # from token 11, one token into shard 2
    assert later == {2: [11, 12, 13], 3: [14, 15, 16, 17], 4: [18, 19]} and ended == [2, 3]


def test_transient_errors_are_the_network_kind():
    class HTTPError(OSError):
        def __init__(self, status):
            self.response = type("R", (), {"status_code": status})()

    for error in (ConnectionResetError(), TimeoutError(), OSError("I/O"), HTTPError(503), HTTPError(429)):
        assert is_transient(error), error
    for error in (FileNotFoundError(), PermissionError(), HTTPError(404), ValueError("bad parquet")):
        assert not is_transient(error), error
    assert [retry_delay(i) for i in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
