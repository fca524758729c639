"""train.py's refusals: bad input and a hostile environment end with one `error:` line, exit code 2, before anything is
written and without importing torch where they can."""

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from gpt2_repro.base.errors import ConfigError, DataError
from runs import ROOT, TINY_ARGS, expect_exit_2, run_env, run_unchecked


def test_missing_data_is_reported_before_anything_starts(tmp_path):
    import train

    with pytest.raises(ConfigError, match="no training shards in data_dir=.*python data_prep.py"):
        train.main(["--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def _no_torch_run(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """train.py under `python -X importtime`: (the finished process, the modules it imported)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, imported


HEAVY = {"torch", "transformers", "accelerate", "datasets"}


def test_help_a_config_error_and_a_refused_start_import_no_torch(data_dir, corrupted_data, tmp_path):
    """What answers at once must not wait for torch and transformers (6-7 s of imports): --help, a config error,
    a second run into a folder in use, missing or corrupted data, a disk without room for a checkpoint (a model of
    16 PB: no disk has that much free). Checked on what each process imported (python -X importtime)."""
    from gpt2_repro.base.lock import RunLock

    busy = tmp_path / "busy"
    tiny = [*TINY_ARGS, "--data_dir", str(data_dir)]
    cases = {
        "--help": (["--help"], None),
        "config error": (["--max_lr", "-1", "--data_dir", str(data_dir)], "optim.max_lr=-1.0 must be positive"),
        "folder in use": ([*tiny, "--output_dir", str(busy)], "is in use by another run"),
        "missing data": (
            [*TINY_ARGS, "--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "a")],
            "no training shards in data_dir=",
        ),
        "corrupted data": (
            [*TINY_ARGS, "--data_dir", str(corrupted_data), "--output_dir", str(tmp_path / "b")],
            "its SHA-256 differs from manifest.json",
        ),
        "no room": (
            [*tiny, "--n_layer", "1000", "--n_embd", "262144", "--output_dir", str(tmp_path / "c")],
            "GB free, but room for 3 more checkpoints (a new one is written before the oldest of --keep_last 2 is "
            "removed) needs about 49479019.97 GB. Free some space or choose --output_dir on another disk",
        ),
        # the model's shape and dropout, and the trackers, are checked with the rest of the config
        "n_head": ([*tiny, "--n_head", "0"], "model.n_head=0 must be a positive integer"),
        "dropout": ([*tiny, "--dropout", "1.5"], "model.dropout=1.5 must be in [0, 1)"),
        "vocab": (
            [*tiny, "--vocab_size", "100"],
            "model.vocab_size=100 is smaller than the GPT-2 tokenizer's 50257 ids",
        ),
        "tracker": ([*tiny, "--log_with", "foo"], "run.log_with='foo': unknown tracker 'foo'"),
    }
    with RunLock(busy):
        for name, (args, message) in cases.items():
            proc, imported = _no_torch_run(args)
            if message is None:
                assert proc.returncode == 0 and "--max_lr" in proc.stdout, proc.stderr[-2000:]
            else:
                assert expect_exit_2(proc) and message in proc.stderr, name
            assert not HEAVY & imported, name
    for folder in ("a", "b", "c"):
        assert not (tmp_path / folder / "config.yaml").exists() and not (tmp_path / folder / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_resume_that_does_not_fit_is_refused_at_once_naming_the_optimizer(reference, data_dir, tmp_path):
    """The AdamW reference resumed with --optimizer muon: its optimizer state cannot be Muon's. Refused before torch
    is imported, naming `optimizer` alone, and nothing in the run folder changes. (On a copy: a run into the shared
    reference would hold its lock while other tests start theirs there.)"""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run, symlinks=True)  # as cp -a: checkpoint-N stays a link
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    args = [*TINY_ARGS, "--data_dir", str(data_dir), "--output_dir", str(run), "--resume", "latest"]
    proc, imported = _no_torch_run([*args, "--optimizer", "muon"])
    line = expect_exit_2(proc)
    assert "step_00000016 cannot be resumed with these settings: optimizer: 'adamw' in the checkpoint, 'muon' now." in (
        line
    )
    assert not HEAVY & imported
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max_lr", "-1e-3"], "optim.max_lr=-0.001 must be positive"),  # a negative value reaches its check
        (["--max_steps", "99999999999999999999999"], "--max_steps: 99999999999999999999999 is out of range"),
        (["--max_steps", "1e30"], "--max_steps: 1000000000000000000000000000000 is out of range"),
        (["--warmup_steps", "300", "--max_steps", "200"], "warmup_steps=300 exceeds max_steps=200"),
        (["--config", "{tmp}/twice.yaml"], "the key 'max_steps' is given twice (lines 2 and 3): keep one"),
        (["--config", "{tmp}"], "is a folder, not a YAML file"),
    ],
)
def test_options_are_read_exactly_and_refused_by_range(args, expected, tmp_path):
    """What the command line and a preset say is read as written (a negative number is a value, an integer is
    not rounded through a float, a key given twice is not silently one of them) and refused by its range."""
    (tmp_path / "twice.yaml").write_text("optim:\n  max_steps: 5\n  max_steps: 7\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    cmd = [sys.executable, str(ROOT / "train.py"), *args, "--data_dir", str(tmp_path / "none")]  # never reached
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    expect_exit_2(proc)
    assert expected in proc.stderr, proc.stderr  # a config error lists each problem on a line of its own


@pytest.mark.slow
def test_an_unfinished_data_folder_is_refused_with_the_command_that_finishes_it(gpt2_encoding, tmp_path):
    """data_prep.py stopped after a few shards (manifest.json: complete false): training refuses to start on it,
    naming the command that finishes it, made of every option the preparation recorded (here plain-text files read
    by paragraph) and quoted (a path with a space); that command finishes it, and the same command line trains."""
    from gpt2_repro.data.prepare import PrepConfig, prepare
    from synthetic import FlakyReads, make_texts

    source = tmp_path / "my source"
    source.mkdir()
    texts = make_texts(160, seed=6, words=(50, 400))
    for i in range(8):
        (source / f"part_{i:03d}.txt").write_text("\n\n".join(texts[i * 20 : (i + 1) * 20]))
    data = tmp_path / "my data"
    cfg = PrepConfig(
        dataset=str(source),
        output_dir=str(data),
        val_tokens=2048,
        shard_tokens=2000,
        batch_docs=16,
        retries=0,
        text_sample_by="paragraph",
    )
    with FlakyReads("part_005", failures=10**9), pytest.raises(DataError):
        prepare(cfg)  # a read that keeps failing: the finished shards stay, the rest is to come
    assert not json.loads((data / "manifest.json").read_text())["complete"]
    line = expect_exit_2(run_unchecked(["--data_dir", str(data), "--hellaswag", "false"], tmp_path / "run"))
    assert f"{data} is unfinished: data_prep.py stopped after" in line and "complete: false" in line, line
    finish = shlex.split(line.split("Finish it first: `")[1].split("`")[0])
    assert finish[:3] == ["python", "data_prep.py", "--dataset"] and "--shard_tokens" in finish
    assert finish[finish.index("--text_sample_by") + 1] == "paragraph"
    done = subprocess.run(
        [sys.executable, *finish[1:]], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    args = ["--data_dir", str(data), "--hellaswag", "false", "--max_steps", "2", "--eval_every", "0"]
    proc = run_unchecked([*args, "--checkpoint_every", "0", "--num_samples", "0"], tmp_path / "run")
    assert proc.returncode == 0 and "every shard matches manifest.json" in proc.stdout + proc.stderr, proc.stderr


@pytest.fixture
def corrupted_data(data_dir, tmp_path):
    """The test shards with a manifest.json, and one bit of the training shard flipped afterwards."""
    from gpt2_repro.data.shards import file_sha256

    folder = tmp_path / "corrupted"
    shutil.copytree(data_dir, folder)
    files = sorted(folder.glob("*.bin"))
    shards = [{"file": f.name, "tokens": (f.stat().st_size - 1024) // 2, "sha256": file_sha256(f)} for f in files]
    (folder / "manifest.json").write_text(json.dumps({"created_by": "data_prep.py", "shards": shards}))
    raw = bytearray(files[-1].read_bytes())
    raw[5000] ^= 0x01
    files[-1].write_bytes(raw)
    return folder


def test_verify_data_false_skips_the_shard_check(corrupted_data, data_dir):
    """The check a run makes at start-up (the data source's verify): a flipped bit is refused; --verify_data false
    skips the SHA-256s, saying nothing; and shards without a manifest.json are trained on with one warning line."""
    from gpt2_repro.base.config import load_config
    from gpt2_repro.data.shard_loader import TokenShardLoader

    said = []
    with pytest.raises(DataError, match="its SHA-256 differs from manifest.json"):
        TokenShardLoader.verify(load_config(None, {"data_dir": str(corrupted_data)}), said.append)
    TokenShardLoader.verify(load_config(None, {"data_dir": str(corrupted_data), "verify_data": "false"}), said.append)
    assert said == []
    TokenShardLoader.verify(load_config(None, {"data_dir": str(data_dir)}), said.append)
    assert len(said) == 1 and said[0].startswith(f"warning: {data_dir} has no manifest.json"), said


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "bad_yaml",
        "yaml_not_utf8",
        "infinite_lr",
        "output_is_file",
        "output_under_file",
        "readonly",
        "file_size_limit",
        "corrupted",
    ],
)
def test_input_and_environment_errors_exit_2_with_one_line(case, data_dir, tmp_path, request):
    """Each ends with one `error:` line naming the problem and the fix, exit code 2, no traceback, and destroys
    nothing. A full disk is simulated with a file-size limit (ulimit -f): the run refuses up front when a
    checkpoint file would not fit."""
    args, out, preexec = ["--data_dir", str(data_dir)], tmp_path / "run", None
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    if case == "bad_yaml":
        (tmp_path / "bad.yaml").write_text("optim:\n  max_steps: [12\n")
        args += ["--config", str(tmp_path / "bad.yaml")]
        expected = "bad.yaml is not valid YAML"
    elif case == "yaml_not_utf8":
        (tmp_path / "latin1.yaml").write_bytes("run:\n  project_name: caf\xe9\n".encode("latin-1"))
        args += ["--config", str(tmp_path / "latin1.yaml")]
        expected = "latin1.yaml is not UTF-8 text (byte 0xe9 on line 2): save it as UTF-8"
    elif case == "infinite_lr":
        args += ["--max_lr", "inf"]
        expected = "--max_lr: expected a finite number, got inf"
    elif case == "output_is_file":
        out, expected = a_file, "a file stands where a folder is needed"
    elif case == "output_under_file":
        out, expected = a_file / "run", "a file stands where a folder is needed"
    elif case == "readonly":
        out = request.getfixturevalue("readonly_dir") / "run"
        expected = f"cannot use --output_dir {out}: " + (
            "read-only file system" if os.geteuid() == 0 else "permission denied"
        )
    elif case == "file_size_limit":

        def preexec():  # what a full disk does to the largest file, without filling a disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (10_000_000, 10_000_000))

        expected = "the file-size limit (ulimit -f) is 10,000,000 bytes"
    else:
        args = ["--data_dir", str(request.getfixturevalue("corrupted_data"))]
        expected = "its SHA-256 differs from manifest.json"
    line = expect_exit_2(run_unchecked(args, out, preexec_fn=preexec))
    assert expected in line, line
    assert a_file.read_text() == "keep me"
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB file system (tmpfs, as root): room for two of the tiny test model's checkpoints as train.py counts
    them (about 66 MB each, 53 MB on disk), not for three."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_the_disk_must_hold_the_checkpoints_kept_at_once_and_a_later_full_disk_names_the_way_back(
    small_disk, data_dir, tmp_path
):
    """A new checkpoint is written before the oldest is removed: with --keep_last 2 and four saves to come the run
    holds three at once, which the disk cannot, so it is refused at start (not at its third checkpoint). With
    --keep_last 1 two are enough and the run starts; when the disk fills up during the run, the save that cannot
    be written names the steps it loses and the checkpoint to resume."""
    from runs import training_in_background, wait_for_step

    run = small_disk / "run"
    line = expect_exit_2(run_unchecked(["--data_dir", str(data_dir)], run))
    assert f"{run} has 0.16 GB free, but room for 3 more checkpoints" in line, line
    assert "--keep_last 2" in line and not (run / "checkpoints").exists()

    args = ["--data_dir", str(data_dir), "--keep_last", "1", "--checkpoint_every", "8", "--eval_every", "0"]
    args += ["--hellaswag", "false", "--num_samples", "0", "--log_with", "none"]
    first = run / "checkpoints" / "step_00000008"
    with training_in_background(args, run) as proc:
        wait_for_step(run, 9, proc)  # the first checkpoint is whole: leave the next one no room
        free = shutil.disk_usage(small_disk).free
        (small_disk / "filler").write_bytes(b"\0" * (free - 20_000_000))
        _, stderr = proc.communicate(timeout=240)
    line = expect_exit_2(proc, stderr)
    assert "checkpoint step 16 needs about 0.07 GB" in line and "Steps 9-16 are not saved" in line, line
    assert f"the newest complete checkpoint is {first} (step 8): continue with --resume latest" in line, line
