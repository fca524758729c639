"""base/cli.py: one command-line convention for train.py, data_prep.py and evaluate_gpt2.py."""

import subprocess
import sys
from pathlib import Path

import pytest

from evaluate_gpt2 import EvaluateArgs
from gpt2_repro.base.cli import DEBUG_ENV, build_parser, debugging, parse, run
from gpt2_repro.base.config import TrainConfig
from gpt2_repro.base.errors import ConfigError, NotFound, Stop
from gpt2_repro.data.prepare import PrepConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("cls", "argv", "where", "expected"),
    [
        (TrainConfig, ["--max_steps", "4000"], ("optim", "max_steps"), 4000),
        (TrainConfig, ["--max-steps", "4e3"], ("optim", "max_steps"), 4000),
        (TrainConfig, ["--shuffle", "false"], ("data", "shuffle"), False),
        (TrainConfig, ["--shuffle"], ("data", "shuffle"), True),
        (PrepConfig, ["--output-dir", "o", "--max-tokens", "5e6"], ("max_tokens",), 5_000_000),
        (PrepConfig, ["--output_dir", "o", "--progress", "no"], ("progress",), False),
        (EvaluateArgs, ["--model", "gpt2", "--model-card", "false"], ("model_card",), False),
        (EvaluateArgs, ["--model", "gpt2", "--trust_remote_code"], ("trust_remote_code",), True),
        (EvaluateArgs, ["--model", "gpt2", "--hellaswag-limit", "none"], ("hellaswag_limit",), None),
        (EvaluateArgs, ["--model", "gpt2", "--limit", "none"], ("hellaswag_limit",), None),  # the older spelling
        (TrainConfig, ["--report_to", "none"], ("run", "log_with"), "none"),  # Trainer's name for --log_with
        (TrainConfig, ["--report-to", "wandb", "--log_with", "wandb"], ("run", "log_with"), "wandb"),
    ],
)
def test_every_script_takes_the_same_spellings(cls, argv, where, expected):
    value = parse(cls, argv)
    for name in where:
        value = getattr(value, name)
    assert value == expected


def test_unknown_options_get_a_did_you_mean_in_every_script(capsys):
    for cls, argv in [
        (TrainConfig, ["--max-step", "3"]),
        (PrepConfig, ["--output_dir", "o", "--max_token", "3"]),
        (EvaluateArgs, ["--model", "m", "--max_steps", "3"]),
    ]:
        with pytest.raises(SystemExit) as e:
            parse(cls, argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Did you mean --max_steps?" in err and "Did you mean --max_tokens?" in err


def test_values_are_typed_and_choices_checked():
    with pytest.raises(ConfigError, match="--val_tokens: expected int or null, got 'many'"):
        parse(EvaluateArgs, ["--model", "m", "--val_tokens", "many"])
    with pytest.raises(ConfigError, match="--device: expected one of auto, cpu, cuda, got 'gpu'"):
        parse(EvaluateArgs, ["--model", "m", "--device", "gpu"])
    with pytest.raises(ConfigError, match="missing required option --output_dir"):
        parse(PrepConfig, ["--dataset", "x.txt"])
    with pytest.raises(ConfigError, match="--batch_size must be a positive integer"):
        parse(EvaluateArgs, ["--model", "m", "--batch_size", "0"])


def test_an_alias_and_its_option_with_different_values_are_refused():
    with pytest.raises(ConfigError, match=r"--report_to is another name for --log_with.*\('none', 'wandb'\)"):
        parse(TrainConfig, ["--log_with", "wandb", "--report_to", "none"])


def test_yaml_presets_for_flat_and_sectioned_configs(tmp_path):
    (tmp_path / "eval.yaml").write_text("model: runs/x/export\nhellaswag_limit: 100\n")
    args = parse(EvaluateArgs, ["--config", str(tmp_path / "eval.yaml"), "--hellaswag_limit", "7"])
    assert args.model == "runs/x/export" and args.hellaswag_limit == 7  # the command line overrides the preset
    (tmp_path / "train.yaml").write_text("optim:\n  max_steps: 1200\nrun:\n  seed: 5\n")
    cfg = parse(TrainConfig, ["--config", str(tmp_path / "train.yaml")])
    assert (cfg.optim.max_steps, cfg.run.seed, cfg.data.seq_len) == (1200, 5, 1024)
    (tmp_path / "bad.yaml").write_text("optim:\n  max_steps: [12\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        parse(TrainConfig, ["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "typo.yaml").write_text("max_token: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'max_token'. Did you mean 'max_tokens'"):
        parse(PrepConfig, ["--config", str(tmp_path / "typo.yaml"), "--output_dir", "o"])


def test_help_lists_each_option_with_its_type_and_default():
    for script, option in [
        ("train.py", "--micro_batch_size"),
        ("data_prep.py", "--shard_tokens"),
        ("evaluate_gpt2.py", "--hellaswag_file"),
        ("sample.py", "--sample_tokens"),
    ]:
        proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and option in proc.stdout and "--config" in proc.stdout
        assert option.replace("_", "-") in proc.stdout  # the dashed alias
        if script == "train.py":  # Trainer's name beside ours
            assert "--report_to STR, --report-to STR" in proc.stdout and "the same as --log_with" in proc.stdout


# One name for one thing across the scripts: (script's config, its name, the old spelling kept as an alias, a value)
RENAMED = [
    (PrepConfig, "dataset_name", "name", "sample-10BT"),
    (PrepConfig, "dataset_split", "split", "validation"),
    (EvaluateArgs, "hellaswag_limit", "limit", 7),
    (EvaluateArgs, "eval_batch_size", "val_batch_size", 4),
]
REQUIRED = {PrepConfig: ["--output_dir", "o"], EvaluateArgs: ["--model", "m"]}


@pytest.mark.parametrize(("cls", "name", "alias", "value"), RENAMED)
def test_an_option_has_one_name_everywhere_and_its_old_spelling_still_works(tmp_path, cls, name, alias, value):
    """The same setting has train.py's name in every script; the old spelling is an alias: on the command line
    (both spellings), in a YAML preset, in --help. Giving both in one preset is refused."""
    from gpt2_repro.base.cli import option_index

    assert name in option_index(TrainConfig) and alias not in option_index(TrainConfig)
    for flag in (f"--{name}", f"--{alias}", f"--{alias.replace('_', '-')}"):
        assert getattr(parse(cls, [*REQUIRED[cls], flag, str(value)]), name) == value, flag
    (tmp_path / "old.yaml").write_text(f"{alias}: {value}\n")
    assert getattr(parse(cls, [*REQUIRED[cls], "--config", str(tmp_path / "old.yaml")]), name) == value
    (tmp_path / "both.yaml").write_text(f"{alias}: {value}\n{name}: {value}\n")
    with pytest.raises(ConfigError, match="given twice"):
        parse(cls, [*REQUIRED[cls], "--config", str(tmp_path / "both.yaml")])
    help_text = " ".join(build_parser(cls).format_help().split())
    assert f"--{name}" in help_text and f"--{alias}" in help_text


def test_the_scripts_help_shows_the_old_spellings():
    for script, new, old in [
        ("data_prep.py", "--dataset_name", "--name"),
        ("evaluate_gpt2.py", "--hellaswag_limit", "--limit"),
    ]:
        proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
        text = " ".join(proc.stdout.split())  # argparse wraps the help to the terminal's width
        assert f"{old} STR" in text or f"{old} INT" in text, text
        assert f"the same as {new}" in text.split(f" {old} ", 1)[1][:200], text


def _exit_of(main, argv=(), **env):
    """(exit code, stderr) of run(main) in this process, with the command line `script.py *argv`."""
    import contextlib
    import io

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setattr(sys, "argv", ["script.py", *argv])
        with pytest.raises(SystemExit) as e:
            run(main)
    return e.value.code, err.getvalue()


def test_expected_errors_end_in_one_error_line_and_exit_code_2():
    import errno

    def config_error():
        raise ConfigError("--x must be positive")

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/optimizer.bin")

    def rust_io_error():  # how safetensors reports a full disk
        raise RuntimeError("Error while serializing: I/O error: File too large (os error 27)")

    def stop():
        raise Stop("stopped at step 7: continue with --resume latest", 75)

    assert _exit_of(config_error) == (2, "error: --x must be positive\n")
    code, err = _exit_of(disk_full)
    assert code == 2 and err.startswith("error: no space left on the device at /runs/x/optimizer.bin")
    assert "free some space" in err and err.count("\n") == 1
    code, err = _exit_of(rust_io_error)
    assert code == 2 and "file-size limit" in err
    assert _exit_of(stop) == (75, "stopped at step 7: continue with --resume latest\n")


def test_bugs_keep_their_traceback_and_debug_shows_every_traceback(monkeypatch):
    def bug():
        raise KeyError("a real bug")

    def missing_file_bug():  # a path the code got wrong, not one the user gave: NotFound is for those
        Path("/nonexistent/gpt2-repro/file").read_text()

    monkeypatch.setattr(sys, "argv", ["script.py"])
    with pytest.raises(KeyError):
        run(bug)
    with pytest.raises(FileNotFoundError):
        run(missing_file_bug)
    code, err = _exit_of(lambda: (_ for _ in ()).throw(NotFound("no shards in data/x: prepare them first")))
    assert (code, err) == (2, "error: no shards in data/x: prepare them first\n")

    def config_error():
        raise ConfigError("bad")

    def stop():
        raise Stop("stopped at step 7", 75)

    # --debug (or the variable) adds the traceback and keeps the exit code: a requeue on 75 sees 75 either way
    for debug_env, argv in [({DEBUG_ENV: "1"}, []), ({}, ["--debug"])]:
        code, err = _exit_of(config_error, argv, **debug_env)
        assert code == 2 and "Traceback" in err and "ConfigError: bad" in err and err.endswith("error: bad\n")
        code, err = _exit_of(stop, argv, **debug_env)
        assert code == 75 and "Traceback" in err and err.endswith("stopped at step 7\n")
    assert debugging(["--debug", "false"]) is False and debugging(["--debug=true"]) is True


def test_auto_is_an_unset_value_only_where_the_help_says_so():
    """`auto` leaves unset the fields whose help offers it (chosen for you); elsewhere it is a value like any other
    (a file or a repository may be called auto), and --resume auto is litgpt's spelling of latest."""
    cfg = parse(TrainConfig, ["--compile", "auto", "--cpu_threads", "auto", "--hellaswag_file", "auto"])
    assert cfg.run.compile is None and cfg.run.cpu_threads is None and cfg.eval.hellaswag_file == "auto"
    assert parse(TrainConfig, ["--resume", "auto"]).checkpoint.resume == "latest"
    assert parse(TrainConfig, ["--push_to_hub", "none"]).checkpoint.push_to_hub is None
    assert parse(EvaluateArgs, ["--model", "m", "--seq_len", "auto"]).seq_len is None
