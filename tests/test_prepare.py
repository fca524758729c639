"""data/prepare.py and data_prep.py: text to shards (tokens, manifest, resume after SIGKILL, refusals, bad input), on
generated data."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import data_prep as dp
from gpt2_repro.base import cli
from gpt2_repro.base.atomic_io import is_temporary
from gpt2_repro.base.errors import DataError
from gpt2_repro.data.prepare import PrepConfig, prepare
from gpt2_repro.data.shards import read_shard, write_shard
from synthetic import EOT, FlakyReads, make_texts, reference_tokens, write_fineweb_parquet

ROOT = Path(__file__).resolve().parents[1]


def shard_stream(out: Path, manifest: dict) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(out / s["file"])) for s in manifest["shards"]])


def folder_bytes(folder: Path) -> dict:
    """Every file's bytes but the lock file's (which names its holder: pid, host, time)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def prep(dataset, out, **kw) -> dict:
    kw = {"val_tokens": 3000, "shard_tokens": 10_000, "num_workers": 2, "batch_docs": 16, **kw}
    return prepare(PrepConfig(dataset=str(dataset), output_dir=str(out), **kw))


def test_prepare_parquet_tokens_and_manifest(fineweb, gpt2_encoding, tmp_path):
    path, texts = fineweb
    out = tmp_path / "out"
    m = prep(path, out)
    ref = reference_tokens(gpt2_encoding, texts)
    assert m["complete"] and m["tokens"] == len(ref)
    assert m["documents"] == 397 and m["skipped_documents"] == 3
    assert np.array_equal(shard_stream(out, m), ref)
    names = [s["file"] for s in m["shards"]]
    assert names[0] == "fineweb-sample_val_000000.bin" and names[1] == "fineweb-sample_train_000001.bin"
    sizes = [s["tokens"] for s in m["shards"]]
    # the val shard: --val_tokens 3000 scored targets, so 3,001 tokens
    assert sizes[0] == 3001 and all(n == 10_000 for n in sizes[1:-1]) and 0 < sizes[-1] <= 10_000
    assert m["val_tokens"] == 3001 and m["train_tokens"] == len(ref) - 3001
    for s in m["shards"]:
        assert s["sha256"] == hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
        assert s["documents"] == int((read_shard(out / s["file"]) == EOT).sum())
    assert m["source"]["data_files"] == [str(path.resolve())] and m["source"]["text_column"] == "text"
    assert m["tokenizer"]["eot_token"] == EOT and m["document_delimiter"] == "eot_before_each_document"
    assert json.loads((out / "manifest.json").read_text()) == m
    # Rerunning a finished run changes nothing.
    before = folder_bytes(out)
    assert prep(path, out)["complete"]
    assert folder_bytes(out) == before


def test_max_tokens_takes_an_exact_prefix(fineweb, gpt2_encoding, tmp_path):
    path, texts = fineweb
    m = prep(path, tmp_path / "o", max_tokens=12_345)
    assert m["tokens"] == 12_345 and [s["tokens"] for s in m["shards"]] == [3001, 9344]  # 3,000 scored val targets
    assert np.array_equal(shard_stream(tmp_path / "o", m), reference_tokens(gpt2_encoding, texts)[:12_345])


def test_jsonl_text_folder_and_glob_take_the_same_path(fineweb, gpt2_encoding, tmp_path):
    _, texts = fineweb
    docs = [t for t in texts[:60] if t]
    ref = reference_tokens(gpt2_encoding, docs)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(docs)))
    txt_dir = tmp_path / "books"
    txt_dir.mkdir()
    for i, t in enumerate(docs):
        (txt_dir / f"book_{i:03d}.txt").write_text(t)
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    write_fineweb_parquet(pq_dir / "part_0.parquet", docs[:25])
    write_fineweb_parquet(pq_dir / "part_1.parquet", docs[25:])
    for i, (dataset, kw) in enumerate(
        [(jsonl, {"text_column": "body"}), (txt_dir, {}), (pq_dir, {}), (f"{pq_dir}/*.parquet", {})]
    ):
        m = prep(dataset, tmp_path / f"out{i}", val_tokens=1000, **kw)
        assert np.array_equal(shard_stream(tmp_path / f"out{i}", m), ref), dataset


def _run_until(cmd: list[str], out: Path, sig: int) -> tuple[int, str]:
    """Start data_prep.py, send `sig` once it has written a train shard of its own; (exit code, stderr)."""
    # A shard the previous run finished as it was stopped would otherwise trigger the signal during start-up, before
    # the handler exists.
    before = set(out.glob("*_train_*.bin"))
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # Ctrl-C as in a terminal, also when pytest runs in the background (`nohup ... &` ignores SIGINT, and an
        # ignored signal stays ignored in every child)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 90
    while not set(out.glob("*_train_*.bin")) - before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate()
    return proc.returncode, err.decode()


@pytest.mark.slow
def test_interrupted_run_resumes_byte_identical_and_refuses_a_changed_source(gpt2_encoding, tmp_path):
    """SIGTERM a real CLI run, rerun it and Ctrl-C it (SIGINT), rerun it and SIGKILL it, change the source
    (refused), restore it, resume; compare with an uninterrupted run."""
    texts = make_texts(1500, seed=1, words=(50, 400))
    data = write_fineweb_parquet(tmp_path / "big.parquet", texts)
    args = ["--dataset", str(data), "--val_tokens", "5000", "--shard_tokens", "1500", "--batch_docs", "4"]
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "data_prep.py"), *args, "--output_dir", str(out)]
    code, err = _run_until([*cmd, "--num_workers", "1"], out, signal.SIGTERM)
    assert code == 130, err[-2000:]
    assert "finished shard(s) kept: rerun the same command to continue" in err and "Traceback" not in err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    code, err = _run_until([*cmd, "--num_workers", "1"], out, signal.SIGINT)  # Ctrl-C
    assert code == 130 and "Resuming" in err, err[-2000:]
    assert "finished shard(s) kept: rerun the same command to continue" in err and "Traceback" not in err
    assert not [p for p in out.iterdir() if is_temporary(p.name)], "temporary files left behind"
    code, err = _run_until([*cmd, "--num_workers", "1"], out, signal.SIGKILL)
    assert code == -signal.SIGKILL, err[-2000:]
    assert "Resuming" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and "resume" in manifest, "the run finished before it could be interrupted"
    finished = {s["file"] for s in manifest["shards"]}

    cfg = dict(val_tokens=5000, shard_tokens=1500, batch_docs=4)
    original, stat = data.read_bytes(), data.stat()
    write_fineweb_parquet(data, texts[:700] + texts[701:] + texts[700:701])  # rewritten: other content
    # The killed run may have left a temporary file: the refused run removes it and nothing else.
    before = {name: b for name, b in folder_bytes(out).items() if not is_temporary(name)}
    with pytest.raises(DataError, match=r"source changed since .*big\.parquet: changed.*new --output_dir"):
        prep(data, out, num_workers=2, **cfg)
    assert folder_bytes(out) == before
    data.write_bytes(original)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the very same file again
    m_resumed = prep(data, out, num_workers=2, **cfg)
    m_clean = prep(data, tmp_path / "clean", num_workers=1, **cfg)
    assert len(finished) < len(m_clean["shards"])
    assert m_resumed == m_clean
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")
    assert np.array_equal(shard_stream(out, m_resumed), reference_tokens(gpt2_encoding, texts))


def test_a_corrupted_shard_is_found_by_a_rerun_and_by_verify(fineweb, tmp_path):
    path, _ = fineweb
    out = tmp_path / "out"
    m = prep(path, out, max_tokens=40_000)
    assert dp.main(["--verify", str(out)]) == m  # intact
    shard = out / m["shards"][2]["file"]
    raw = bytearray(shard.read_bytes())
    raw[2000] ^= 0x10  # one token changes; the header and the size stay valid
    shard.write_bytes(raw)
    before = folder_bytes(out)
    with pytest.raises(DataError, match=rf"{shard.name}: its SHA-256 differs from manifest.json"):
        prep(path, out, max_tokens=40_000)  # "already complete" is no longer taken on trust
    assert folder_bytes(out) == before
    r = subprocess.run(
        [sys.executable, "data_prep.py", "--verify", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
    assert f"1 of {len(m['shards'])} shard(s) do not match" in r.stderr and shard.name in r.stderr


def test_the_shard_set_is_the_manifests_and_one_preparation_holds_a_folder(fineweb, tmp_path):
    """A shard that manifest.json does not list (copied in, or written by another run) is refused by --verify (and
    by a rerun), as a missing one is; a second data_prep.py into a folder in use is refused at once (its lock)."""
    path, _ = fineweb
    out = tmp_path / "out"
    m = prep(path, out, max_tokens=25_000)
    extra = out / re.sub(r"_\d+\.bin$", "_000009.bin", m["shards"][-1]["file"])
    shutil.copy(out / m["shards"][-1]["file"], extra)
    r = subprocess.run(
        [sys.executable, "data_prep.py", "--verify", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{extra}: a shard that manifest.json does not list" in r.stderr
    with pytest.raises(DataError, match="does not list"):
        prep(path, out, max_tokens=25_000)
    extra.unlink()
    assert dp.main(["--verify", str(out)]) == m

    holder = subprocess.Popen(  # another writer holds the folder (the lock every run and preparation takes)
        [
            sys.executable,
            "-c",
            "import sys, time; from gpt2_repro.base.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)",
            str(tmp_path / "busy"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["--dataset", str(path), "--output_dir", str(tmp_path / "busy"), "--val_tokens", "1000"]
        r = subprocess.run(
            [sys.executable, "data_prep.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {tmp_path / 'busy'} is in use by another preparation (pid {holder.pid} on host" in r.stderr
    assert not list((tmp_path / "busy").glob("*.bin")) and not (tmp_path / "busy" / "manifest.json").exists()


def test_a_manifest_names_only_files_of_its_own_folder(fineweb, tmp_path):
    """A shard name in manifest.json that leads out of the folder ("../victim/x_train_000001.bin") is refused by
    --verify and by a rerun, as an edited manifest, though a file is there: the folder does not hold that shard,
    and nothing outside it is read or described."""
    path, _ = fineweb
    out = tmp_path / "data" / "out"
    m = prep(path, out, max_tokens=25_000)
    victim = tmp_path / "victim"
    victim.mkdir()
    last = m["shards"][-1]["file"]
    shutil.move(out / last, victim / last)
    m["shards"][-1]["file"] = f"../../victim/{last}"
    (out / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run(
        [sys.executable, "data_prep.py", "--verify", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"the shard name '../../victim/{last}' is not a file name in the manifest's folder" in r.stderr
    assert f"{(victim / last).stat().st_size:,}" not in r.stderr
    with pytest.raises(DataError, match="is not a file name in the manifest's folder"):
        prep(path, out, max_tokens=25_000)


def test_what_cannot_work_is_refused_up_front(fineweb, gpt2_encoding, tmp_path):
    path, texts = fineweb
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"--val_tokens 5,000 takes all of --max_tokens 5,000"):
        prep(path, out, val_tokens=5000, max_tokens=5000)
    total = len(reference_tokens(gpt2_encoding, texts))
    with pytest.raises(DataError, match=rf"holds only {total:,} tokens.*nothing was written"):
        prep(path, out, val_tokens=10 * total)
    assert not out.exists()  # created by the failed run, and removed since it stayed empty
    huge = psutil.virtual_memory().total  # tokens: a shard of them needs twice this machine's memory
    r = subprocess.run(
        [sys.executable, "data_prep.py", "--dataset", str(path), "--output_dir", str(out)]
        + ["--shard_tokens", str(huge)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: a shard of {huge:,} tokens needs {2 * huge / 2**30:.1f} GiB")
    assert r.stderr.count("\n") == 1 and "smaller --shard_tokens" in r.stderr
    assert not out.exists()


def _eight_parts_and_a_clean_run(tmp_path: Path) -> tuple[Path, list[str], dict]:
    """A folder of eight parquet parts (20 documents each) and the manifest of an undisturbed run into
    tmp_path/"clean" (2,000-token shards): what the read-error tests compare against."""
    texts = make_texts(160, seed=6, words=(50, 400))
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(8):
        write_fineweb_parquet(folder / f"part_{i:03d}.parquet", texts[i * 20 : (i + 1) * 20])
    return folder, texts, prep(folder, tmp_path / "clean", shard_tokens=2000, progress=False)


@pytest.mark.slow
def test_read_errors_are_retried_or_stop_cleanly_then_resume(gpt2_encoding, tmp_path, capsys):
    """Reads of one file fail (a stand-in for the network). Twice: retried, the same shards. Always: exit 2 with
    one error line, finished shards and manifest intact, nothing half-written; the rerun then finishes the same
    shards as a run that never failed."""
    folder, _, clean = _eight_parts_and_a_clean_run(tmp_path)
    with FlakyReads("part_005", failures=2) as flaky:
        prep(folder, tmp_path / "transient", shard_tokens=2000, progress=False)
    assert flaky.failed == 2 and folder_bytes(tmp_path / "transient") == folder_bytes(tmp_path / "clean")

    out = tmp_path / "persistent"
    args = ["--dataset", str(folder), "--output_dir", str(out), "--val_tokens", "3000"]
    args += ["--shard_tokens", "2000", "--batch_docs", "16", "--retries", "1", "--progress", "false"]
    with FlakyReads("part_005", failures=10**9), pytest.raises(SystemExit) as stopped:
        cli.run(lambda: dp.main(args))  # the script's own exit path
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: Reading the dataset failed 2 times in a row")
    assert "rerun the same command" in err[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 3 < len(manifest["shards"]) < len(clean["shards"])
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(s["file"] for s in manifest["shards"])
    assert not [p for p in out.iterdir() if is_temporary(p)]
    assert dp.main(args)["complete"]
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_a_hub_dataset_is_read_at_the_commit_its_preparation_started_at(gpt2_encoding, tmp_path, monkeypatch):
    """A Hub dataset's fingerprint is its commit: a preparation reads the dataset at the commit the Hub names when it
    starts and records it; a resumed one reads at the recorded commit again, even after the dataset moved on, and ends
    with the shards of an undisturbed run. The Hub is faked at its boundary: the commit lookup (HfApi.dataset_info)
    and the dataset's files (load_dataset of the id streams the local parts, whatever revision it is asked for)."""
    from types import SimpleNamespace

    import datasets
    from huggingface_hub import HfApi

    from gpt2_repro.data import prepare as preparation

    folder, _, clean = _eight_parts_and_a_clean_run(tmp_path)
    parts = sorted(str(p) for p in folder.glob("*.parquet"))
    hub, opened, load_dataset = {"sha": "c0ffee1"}, [], datasets.load_dataset

    def hub_load_dataset(path, name=None, split=None, streaming=False, revision=None, **kwargs):
        if path != "me/corpus":  # local files: the real thing
            return load_dataset(path, name, split=split, streaming=streaming, revision=revision, **kwargs)
        opened.append(revision)
        return load_dataset("parquet", data_files=parts, split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", hub_load_dataset)
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, repo_id, **kw: SimpleNamespace(sha=hub["sha"]))
    monkeypatch.setattr(preparation, "hub_reachable", lambda: True)

    out = tmp_path / "hub"
    with FlakyReads("part_005", failures=10**9), pytest.raises(DataError):
        prep("me/corpus", out, shard_tokens=2000, progress=False, retries=0)
    stopped = json.loads((out / "manifest.json").read_text())
    assert not stopped["complete"] and stopped["source_fingerprint"] == {"revision": "c0ffee1"}
    hub["sha"] = "badc0de"  # the dataset moves on while the preparation is stopped
    resumed = prep("me/corpus", out, shard_tokens=2000, progress=False)
    assert opened == ["c0ffee1", "c0ffee1"] and resumed["source_fingerprint"] == {"revision": "c0ffee1"}
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]
    fresh = prep("me/corpus", tmp_path / "fresh", shard_tokens=2000, progress=False)  # a new one: the new commit
    assert opened[-1] == "badc0de" and fresh["source_fingerprint"] == {"revision": "badc0de"}


def test_the_shard_a_killed_run_was_writing_survives_a_refusal_and_is_redone_by_the_resume(gpt2_encoding, tmp_path):
    """SIGKILL can land between a shard's rename and manifest.json's update: the shard is on disk, unrecorded. A rerun
    refused because the source changed leaves it where it is ("nothing was changed"); the resume redoes it."""
    folder, texts, clean = _eight_parts_and_a_clean_run(tmp_path)
    out = tmp_path / "killed"
    with FlakyReads("part_005", failures=10**9), pytest.raises(DataError):
        prep(folder, out, shard_tokens=2000, progress=False, retries=0)
    unrecorded = clean["shards"][len(json.loads((out / "manifest.json").read_text())["shards"])]["file"]
    whole = (tmp_path / "clean" / unrecorded).read_bytes()
    (out / unrecorded).write_bytes(whole[: len(whole) // 2])  # killed while it was being recorded

    last = folder / "part_007.parquet"
    original, stat = last.read_bytes(), last.stat()
    write_fineweb_parquet(last, texts[140:159])
    before = folder_bytes(out)
    with pytest.raises(DataError, match="source changed since"):
        prep(folder, out, shard_tokens=2000, progress=False)
    assert folder_bytes(out) == before
    last.write_bytes(original)
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prep(folder, out, shard_tokens=2000, progress=False)["complete"]
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_output_dir_of_another_source_is_refused_untouched(gpt2_encoding, fineweb, tmp_path):
    path, texts = fineweb
    out = tmp_path / "out"
    prep(path, out, max_tokens=20_000)
    before = folder_bytes(out)
    other = write_fineweb_parquet(tmp_path / "other.parquet", texts[:100])
    with pytest.raises(DataError, match=r"another source.*data_files.*other\.parquet"):
        prep(other, out, max_tokens=20_000)
    with pytest.raises(DataError, match="settings.shard_tokens: 10000 there, 5000 now"):
        prep(path, out, max_tokens=20_000, shard_tokens=5000)
    assert folder_bytes(out) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    write_shard(foreign / "fineweb_train_000001.bin", np.arange(10))
    before = folder_bytes(foreign)
    with pytest.raises(DataError, match="fineweb_train_000001.bin.*no manifest.json"):
        prep(path, foreign)
    assert folder_bytes(foreign) == before


def test_bad_inputs_give_clear_errors(gpt2_encoding, fineweb, tmp_path):
    path, _ = fineweb
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"no column 'content'.*'text', 'id', 'dump', 'url'"):
        prep(path, out, text_column="content")
    with pytest.raises(DataError, match="'token_count' holds .*int64.*not text"):
        prep(path, out, text_column="token_count")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        prep(tmp_path / "missing.parquet", out)
    with pytest.raises(FileNotFoundError, match="no file matches this glob"):
        prep(tmp_path / "nothing" / "*.parquet", out)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    write_fineweb_parquet(corrupt / "a.parquet", ["fine"])
    (corrupt / "b.parquet").write_bytes(b"this is not parquet" * 10)
    with pytest.raises(DataError, match=r"Cannot read .*b\.parquet"):
        prep(corrupt, out)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_fineweb_parquet(mixed / "a.parquet", ["fine"])
    (mixed / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="all parquet, all jsonl/json or all txt"):
        prep(mixed, out)
    empty = write_fineweb_parquet(tmp_path / "empty.parquet", ["", None, "  "])
    with pytest.raises(DataError, match=r"no tokens.*\(3 skipped\)"):
        prep(empty, out)
    with pytest.raises(DataError, match="must be positive"):
        prep(path, out, shard_tokens=0)
    with pytest.raises(DataError, match="single split 'train', not 'validation'"):
        prep(path, out, dataset_split="validation")
    assert not list(out.glob("*.bin"))


def test_cli_unknown_hub_dataset(gpt2_encoding, tmp_path):
    """Offline (HF_HUB_OFFLINE=1, the network boundary) the Hub error is wrapped in a message with the fixes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "data_prep.py", "--dataset", "no-such-org/no-such-dataset", "--output_dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Could not open dataset 'no-such-org/no-such-dataset'" in r.stderr and "local files" in r.stderr
    assert not list(tmp_path.iterdir())


def test_a_config_file_that_is_not_utf8_is_one_error_line(tmp_path):
    """A YAML preset in another encoding (byte 0xff): exit 2 naming the file, the byte and the line, no traceback."""
    bad = tmp_path / "prep.yaml"
    bad.write_bytes(b"output_dir: out\nname: \xff\n")
    r = subprocess.run(
        [sys.executable, "data_prep.py", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == f"error: {bad} is not UTF-8 text (byte 0xff on line 2): save it as UTF-8.\n"
