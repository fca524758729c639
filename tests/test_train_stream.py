"""train.py --dataset: training straight from a text stream (a multi-file parquet stream of ~5,500 tokens,
conftest.stream_files)."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpt2_repro.base.config import load_config
from gpt2_repro.checkpointing import folders as ckpt
from runs import (
    MAX_STEPS,
    ROOT,
    TINY_ARGS,
    expect_exit_2,
    read_metrics,
    run_env,
    run_training,
    run_unchecked,
    shared_run,
)

STREAM = ["--stream_val_tokens", "2048", "--stream_shard_tokens", "1000", "--stream_batch_docs", "4"]


QUICK = ["--hellaswag", "false", "--num_samples", "0", "--shuffle", "false"]  # 16 steps: into epoch 2


@pytest.fixture(scope="session")
def streamed(tmp_path_factory, stream_files):
    """One uninterrupted run straight from the stream, shuffle off."""
    return shared_run(tmp_path_factory, "streamed", ["--dataset", str(stream_files[0]), *STREAM, *QUICK])[0]


@pytest.mark.slow
def test_streamed_training_equals_training_on_shards_of_the_same_source(streamed, stream_files, tmp_path):
    """data_prep.py with the same settings, then train on its shards: the same losses and validation losses."""
    from gpt2_repro.data import prepare as data_prep

    shards = tmp_path / "shards"
    prep = data_prep.PrepConfig(
        dataset=str(stream_files[0]), output_dir=str(shards), val_tokens=2048, shard_tokens=1000
    )
    manifest = data_prep.prepare(prep)
    run_training(["--data_dir", str(shards), *QUICK], tmp_path / "run")
    losses, evals = read_metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert read_metrics(streamed) == (losses, evals)  # bit-identical: the same windows in the same order
    config = load_config(streamed / "config.yaml")
    assert config.data.dataset == str(stream_files[0]) and config.data.stream_val_tokens == 2048
    state = json.loads((streamed / "checkpoints" / "step_00000016" / "loader_rank0.json").read_text())
    assert state["epoch"] == 1 and state["dataset_state"] is not None
    # The documents that are not text (empty, whitespace-only, null) are skipped and counted as data_prep.py counts
    # them: once an epoch is read, the same number, in the checkpoints' run state and the run's output.
    skipped = manifest["skipped_documents"]
    assert skipped == 3 and ckpt.read_run_state(streamed / "checkpoints" / "step_00000016")["skipped_documents"] == 3
    assert f"{skipped} documents skipped so far" in (streamed.parent / "stdout.txt").read_text()


@pytest.mark.slow
def test_streamed_training_resumes_exactly_after_sigkill(streamed, stream_files, tmp_path):
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--dataset", str(stream_files[0]), *STREAM, *QUICK, "--output_dir", str(out)]
    kill_after = random.Random(13).randint(5, 11)  # anywhere, but the same step every time
    print("killed after step", kill_after)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= kill_after:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert metrics.read_text().count('"loss"') < MAX_STEPS, "the run ended before the kill"
    resumed = run_training(["--dataset", str(stream_files[0]), *STREAM, *QUICK, "--resume", "latest"], out)
    assert "resumed from step" in resumed.stdout + resumed.stderr
    assert read_metrics(out) == read_metrics(streamed), f"killed after step {kill_after}"


@pytest.mark.slow
def test_a_failing_stream_stops_with_one_error_line_and_resumes(streamed, stream_files, tmp_path):
    """From some point on, every read of one file fails (a stand-in for a network outage, installed in the
    training process): the run stops with exit code 2 and an `error:` line after its retries, its checkpoints
    whole; once reads work, --resume latest finishes with the losses of a run that never failed."""
    runner = tmp_path / "train_with_a_broken_file.py"
    runner.write_text(
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from synthetic import FlakyReads\n"
        "FlakyReads('part_022', failures=10**9).install()\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
    )
    out = tmp_path / "run"
    args = ["--dataset", str(stream_files[0]), *STREAM, *QUICK, "--output_dir", str(out)]
    proc = subprocess.run(
        [sys.executable, str(runner), *TINY_ARGS, *args, "--stream_retries", "1"],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = errors[0]
    assert error.startswith("error: Reading the dataset failed 2 times in a row")
    assert "ConnectionResetError" in error and "--resume latest" in error
    done = len(read_metrics(out)[0])
    saved = [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]
    assert 4 <= done < MAX_STEPS and saved and max(saved) <= done, (done, saved)
    assert not list((out / "checkpoints").glob(".*")), "a half-written checkpoint was left"
    run_training([*args[:-2], "--resume", "latest"], out)
    assert read_metrics(out) == read_metrics(streamed)


@pytest.mark.slow
def test_two_processes_read_disjoint_parts_of_the_stream(gpt2_encoding, stream_files, tmp_path):
    """torchrun + gloo: train.py's own loader in each process serves that process's documents, cut as the layout
    says (synthetic.reference_windows): no window read twice, none skipped."""
    from synthetic import reference_windows

    script = tmp_path / "serve.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "import numpy as np, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from gpt2_repro.base.config import parse_args\n"
        "from gpt2_repro.base.run_folder import RunFolder\n"
        "from gpt2_repro.data.source import open_data_source\n"
        "from gpt2_repro.training.accelerator import make_accelerator\n"
        "cfg = parse_args(sys.argv[1:])\n"
        "accelerator = make_accelerator(cfg, RunFolder(cfg.run.output_dir))\n"
        "loader = open_data_source(cfg, accelerator.process_index, accelerator.num_processes)\n"
        "windows = [torch.cat([x, y[:, -1:]], 1) for x, y in (loader.next_batch() for _ in range(16))]\n"
        "out = Path(cfg.run.output_dir) / f'rank{accelerator.process_index}.npy'\n"
        "np.save(out, torch.cat(windows).numpy())\n"
        "loader.close()\n"
        "accelerator.wait_for_everyone()\n"
        "accelerator.end_training()\n"
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [*TINY_ARGS, "--dataset", str(stream_files[0]), *STREAM, *QUICK, "--output_dir", str(tmp_path)]
    proc = subprocess.run(
        [*launcher, str(script), *args],
        cwd=tmp_path,
        env=run_env(ACCELERATE_USE_CPU="true"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, texts = stream_files
    served = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    for rank in range(2):
        expected = reference_windows(gpt2_encoding, texts, 2048, 1000, 32, rank, world_size=2)
        assert len(expected) < len(served[rank]) < 2 * len(expected)  # an epoch and then some
        assert np.array_equal(served[rank][: len(expected)], expected), rank
        assert np.array_equal(served[rank][len(expected) :], expected[: len(served[rank]) - len(expected)])
    assert not {bytes(w) for w in served[0]} & {bytes(w) for w in served[1]}


@pytest.mark.slow
def test_a_permanent_read_problem_is_not_called_a_transient_one(stream_files, tmp_path):
    """A parquet file with no rows cannot be streamed: refused at start-up, naming the file, rather than after
    hours with "once it can be read again, continue with --resume latest" (retrying cannot mend it)."""
    from synthetic import write_fineweb_parquet

    folder = tmp_path / "stream"
    shutil.copytree(stream_files[0], folder)
    write_fineweb_parquet(folder / "part_012b.parquet", [])
    line = expect_exit_2(run_unchecked(["--dataset", str(folder), *STREAM, *QUICK], tmp_path / "run"))
    assert f"{folder / 'part_012b.parquet'} holds no rows" in line and "--resume" not in line, line
    assert not (tmp_path / "run" / "config.yaml").exists()
