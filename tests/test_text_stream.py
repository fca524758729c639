"""text_stream.py: documents to GPT-2 tokens (EOT before each, empty documents skipped)."""

import numpy as np

from synthetic import EOT, reference_tokens
from text_stream import encode_documents


def test_encode_documents_delimits_and_skips(gpt2_encoding):
    texts = ["hello world", "", None, 42, " ", "a <|endoftext|> b", "lone \ud800 surrogate"]
    tokens, skipped = encode_documents(gpt2_encoding, texts)
    assert skipped == 4
    fixed = "lone \ud800 surrogate".encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    expected = reference_tokens(gpt2_encoding, ["hello world", "a <|endoftext|> b", fixed])
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected.tolist()
    assert int((tokens == EOT).sum()) == 3  # the literal "<|endoftext|>" text is ordinary tokens
