"""evaluation/hellaswag.py: HellaSwag files: malformed lines named, a missing file, the download when online."""

import contextlib
import http.server
import json
import threading

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


@contextlib.contextmanager
def serving(files: dict[str, bytes]):
    """A local HTTP server (the network boundary) serving `files` by path; yields (base URL, paths requested)."""
    requested = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


def test_hellaswag_is_downloaded_once_into_the_cache_and_read_from_it(tmp_path, monkeypatch):
    """The download path, offline: a mirror (GPT2_REPRO_HELLASWAG_URL) on a local server, an empty cache
    (GPT2_REPRO_CACHE). The first load downloads the file into the cache, later ones read it there; a mirror that
    answers 404 (and no Hub, offline) is HellaSwagUnavailable naming the address and the way out."""
    from huggingface_hub import constants

    examples = [{"ctx": f"A man {i}", "endings": ["a", "b", "c", "d"], "label": i % 4} for i in range(5)]
    body = "".join(json.dumps(e) + "\n" for e in examples).encode()
    monkeypatch.setenv("GPT2_REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy of the machine must not stand between
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the Hub fallback is not tried either
    with serving({"/hellaswag_val.jsonl": body}) as (url, requested):
        monkeypatch.setenv("GPT2_REPRO_HELLASWAG_URL", f"{url}/hellaswag_val.jsonl")
        assert load_hellaswag() == examples
        cached = tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl"
        assert cached.read_bytes() == body and requested == ["/hellaswag_val.jsonl"]
        assert download_hellaswag() == cached and load_hellaswag(limit=2) == examples[:2]
        assert requested == ["/hellaswag_val.jsonl"]  # read from the cache: not downloaded again

        monkeypatch.setenv("GPT2_REPRO_HELLASWAG_URL", f"{url}/moved.jsonl")
        with pytest.raises(HellaSwagUnavailable, match=r"moved\.jsonl: HTTP Error 404.*--hellaswag_file PATH"):
            download_hellaswag(tmp_path / "other-cache")
        assert not (tmp_path / "other-cache" / "hellaswag_val.jsonl").exists()
