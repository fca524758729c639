"""evaluation/hellaswag.py: HellaSwag files: malformed lines named, a missing file, the download when online."""

import json

import pytest

from gpt2_repro.base.errors import EvaluationInputError, HellaSwagUnavailable
from gpt2_repro.base.published import HELLASWAG_VAL_SIZE
from gpt2_repro.evaluation.hellaswag import download_hellaswag, load_hellaswag


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1', r"bad\.jsonl:2: not valid JSON"),
        ('{"ctx": "A man", "endings": ["a", "b", "c", "d"]}', r"bad\.jsonl:2: missing field\(s\) \['label'\]"),
        ('{"ctx": "A man", "endings": ["a", "b"], "label": 1}', r"endings must be a list of 4 strings"),
        ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": ""}', r"label must be the index 0-3"),
        ('["A man", ["a", "b", "c", "d"], 1]', r"expected a JSON object"),
    ],
)
def test_malformed_hellaswag_lines(tmp_path, line, message):
    good = json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "2"})  # Hub copy: str label
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_hellaswag(path)
    assert load_hellaswag(path, limit=1) == [{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 2}]


def test_a_missing_or_not_utf8_hellaswag_file_is_an_input_error(tmp_path):
    """A file the user named is an input to fix (exit 2 in the scripts), not the "unavailable offline" warning."""
    with pytest.raises(EvaluationInputError, match="Pass the path of hellaswag_val.jsonl"):
        load_hellaswag(tmp_path / "nope.jsonl")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"ctx": "caf\xe9", "endings": ["a", "b", "c", "d"], "label": 0}\n'.encode("latin-1"))
    with pytest.raises(EvaluationInputError, match=r"latin1.jsonl:1: not UTF-8 text \(byte 0xe9 at column 13\)"):
        load_hellaswag(latin1)


def test_hellaswag_download_when_online():
    """The real thing: download (or find in the cache) all 10,042 validation examples. Skips only offline."""
    try:
        path = download_hellaswag()
    except HellaSwagUnavailable as e:
        pytest.skip(f"HellaSwag cannot be downloaded here: {e}")
    examples = load_hellaswag(path)
    assert len(examples) == HELLASWAG_VAL_SIZE and {ex["label"] for ex in examples} == {0, 1, 2, 3}
