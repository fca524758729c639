"""train.py --resume: exact resumes, the logs continued, refused resumes, lines of training, unreadable checkpoints,
stale exports."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2_repro.checkpointing import folders as ckpt
from gpt2_repro.data.shards import write_shard
from runs import MAX_STEPS, RECIPES, ROOT, TINY_ARGS, expect_exit_2, read_metrics, run_env, run_training, run_unchecked
from synthetic import learnable_tokens


def _fake_wandb(folder: Path) -> Path:
    """A stand-in for the wandb client (the W&B network boundary): init() records its arguments."""
    package = folder / "wandb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import json, os\n"
        "class _Config(dict):\n"
        "    def update(self, values, allow_val_change=False):\n"
        "        dict.update(self, values)\n"
        "config = _Config()\n"
        "class Run:\n"
        "    def log(self, values, step=None, **kwargs):\n"
        "        pass\n"
        "    def finish(self):\n"
        "        pass\n"
        "def init(**kwargs):\n"
        "    with open(os.environ['FAKE_WANDB_LOG'], 'a') as f:\n"
        "        f.write(json.dumps(kwargs) + '\\n')\n"
        "    return Run()\n"
    )
    meta = folder / "wandb-0.0.0.dist-info"  # accelerate checks the installed distribution
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: wandb\nVersion: 0.0.0\n")
    return folder


@pytest.mark.slow
def test_a_resumed_run_continues_its_tensorboard_and_wandb_logs(reference, data_dir, tmp_path):
    """Resuming from an earlier checkpoint redoes steps 13-16: TensorBoard shows each step once (the redone
    values), and W&B is asked to continue the same run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref_losses, _ = read_metrics(reference[0])
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    wandb_log = tmp_path / "wandb_init.jsonl"
    env = {"PYTHONPATH": str(_fake_wandb(tmp_path / "site")), "FAKE_WANDB_LOG": str(wandb_log)}
    args = ["--data_dir", str(data_dir), "--hellaswag", "false", "--log_with", "tensorboard,wandb"]
    run_training([*args, "--resume", str(run / "checkpoints" / "step_00000012")], run, **env)
    run_training([*args, "--resume", "latest"], run, **env)  # nothing left to train: starts and stops

    events = EventAccumulator(str(run / "logs" / "gpt2-repro"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]  # the Trainer's namespaces
    assert steps == list(range(1, MAX_STEPS + 1)), steps  # each step once, in order
    values = {e.step: e.value for e in events.Scalars("train/loss")}
    assert values == pytest.approx(ref_losses, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8, 12, 16]
    assert {"train/learning_rate", "train/grad_norm", "train/num_input_tokens_seen"} <= set(events.Tags()["scalars"])
    # Resuming step 12 while step 16 exists started line 2: train/line from there on only, as in metrics.jsonl
    assert [(e.step, e.value) for e in events.Scalars("train/line")] == [(s, 2.0) for s in range(13, MAX_STEPS + 1)]
    first_line = EventAccumulator(str(reference[0] / "logs" / "gpt2-repro"))
    first_line.Reload()
    assert "train/line" not in first_line.Tags()["scalars"]
    # Three starts, one TensorBoard run: the hparams (HPARAMS tab) and the config (TEXT tab) in it, no sub-folder
    assert [p.relative_to(run / "logs") for p in (run / "logs").rglob("*") if p.is_dir()] == [Path("gpt2-repro")]
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert (
        b"optim.max_lr" in hparams["_hparams_/session_start_info"] and b"eval/loss" in hparams["_hparams_/experiment"]
    )
    assert "config/text_summary" in events.Tags()["tensors"]

    inits = [json.loads(line) for line in wandb_log.read_text().splitlines()]
    run_id = (run / "wandb_run_id").read_text().strip()
    assert len(inits) == 2 and run_id
    for init in inits:
        assert init == {"project": "gpt2-repro", "name": "run", "id": run_id, "resume": "allow"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_kill_at_an_arbitrary_step_then_resume_gives_identical_losses(recipe, request, data_dir, tmp_path):
    """Both recipes: every optimizer's state (AdamW's moments, Muon's momentum) is in the checkpoint."""
    fixture, recipe_args = RECIPES[recipe]
    reference = request.getfixturevalue(fixture)
    ref_losses, ref_evals = read_metrics(reference[0])
    out = tmp_path / "run"
    args = [*TINY_ARGS, *recipe_args, "--data_dir", str(data_dir), "--hellaswag", "false", "--output_dir", str(out)]
    kill_after = random.randint(5, 11)  # anywhere: mid-step, mid-evaluation or mid-checkpoint
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= kill_after:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count('"loss"')
    assert proc.returncode == -signal.SIGKILL and done < MAX_STEPS, f"run ended before the kill ({done} steps)"

    resumed = run_training(
        [*recipe_args, "--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "latest"], out
    )
    losses, evals = read_metrics(out)
    assert losses == ref_losses, f"killed after step {kill_after}"  # bit-identical, fp32 on CPU
    assert {s: e["val_loss"] for s, e in evals.items()} == {s: e["val_loss"] for s, e in ref_evals.items()}
    assert "resumed from step" in resumed.stdout + resumed.stderr  # checkpoint 4 was whole before step 5 began
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 16]
    assert not list((out / "checkpoints").glob(".*")), "temporary checkpoint folders left behind"


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(reference, data_dir):
    run, _ = reference
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_ARGS, "--data_dir", str(data_dir), "--output_dir", str(run)]
    again = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr and "--resume latest" in again.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]
    assert len(read_metrics(run)[0]) == MAX_STEPS


@pytest.mark.slow
def test_a_resume_with_other_settings_is_refused_before_anything_is_written(reference, data_dir, tmp_path):
    run, _ = reference
    names = ("config.yaml", "run_info.json", "metrics.jsonl")
    before = {name: (run / name).read_bytes() for name in names}
    other = tmp_path / "other_data"
    shutil.copytree(data_dir, other)
    tokens = learnable_tokens(30000)
    write_shard(other / "test_train_000001.bin", tokens[4096:-100])
    args = ["--data_dir", str(other), "--resume", "latest", "--n_layer", "3", "--seq_len", "16"]
    line = expect_exit_2(run_unchecked(args, run))
    assert "step_00000016 cannot be resumed with these settings: n_layer: 2 in the checkpoint, 3 now;" in line
    assert "seq_len: 32 in the checkpoint, 16 now; data: the training shards are not the checkpoint's" in line
    assert f"--config {run / 'config.yaml'} --resume latest" in line
    assert {name: (run / name).read_bytes() for name in names} == before
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]


@pytest.mark.slow
def test_a_resume_from_an_older_checkpoint_starts_a_new_line_and_keeps_the_old_one(reference, data_dir, tmp_path):
    """Resuming step 12 while step 16 exists (what the divergence advice suggests) starts line 2: step 16 moves to
    checkpoints/abandoned/ with its metrics lines (nothing is deleted), rotation keeps the new line's checkpoints,
    --resume latest continues the new line, and metrics.jsonl and run_info.json say which line each step is."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    old_16 = (run / "checkpoints" / "step_00000016" / "model.safetensors").read_bytes()
    args = ["--data_dir", str(data_dir), "--hellaswag", "false", "--num_samples", "0", "--checkpoint_every", "2"]
    first = run_training([*args, "--resume", str(run / "checkpoints" / "step_00000012"), "--max_lr", "5e-3"], run)
    aside = run / "checkpoints" / "abandoned" / "line-1-after-step_00000012"
    assert (aside / "step_00000016" / "model.safetensors").read_bytes() == old_16  # moved aside, not deleted
    assert [json.loads(r)["step"] for r in (aside / "metrics.jsonl").read_text().splitlines()] == [13, 14, 15, 16, 16]
    assert "line 2 of training starts at step 12" in first.stdout + first.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [14, 16]  # line 2's own
    assert ckpt.read_run_state(run / "checkpoints" / "step_00000016")["line"] == 2
    _, evals = read_metrics(run)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("line", 1) for r in rows if r["step"] <= 12} == {1} and {
        r["line"] for r in rows if r["step"] > 12
    } == {2}
    attempts = json.loads((run / "run_info.json").read_text())["attempts"]
    assert attempts[-1]["line"] == 2 and attempts[-1]["abandoned"] == str(aside)
    again = run_training([*args, "--resume", "latest", "--max_steps", "18"], run)  # the new line goes on: 16 -> 18
    assert "resumed from step 16" in again.stdout + again.stderr
    assert not (run / "checkpoints" / "abandoned" / "line-2-after-step_00000016").exists()
    assert [r.get("line") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())][-1] == 2


@pytest.mark.slow
def test_every_kind_of_unreadable_checkpoint_is_named(reference, tmp_path):
    """What checkpoint_problem finds in a real checkpoint: a truncated model.safetensors or optimizer.bin, a run
    state that does not parse, an optimizer.bin that torch.load(weights_only=True) refuses (a pickle of something
    else than tensors), a deleted optimizer.bin or loader_rank0.json; an intact one passes."""
    import pickle

    source = reference[0] / "checkpoints" / "step_00000016"
    assert ckpt.checkpoint_problem(source) is None

    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    class Payload:  # what a malicious pickle would run on load (weights_only refuses to build it)
        def __reduce__(self):
            return (print, ("pwned",))

    damage = {
        "truncated weights": (lambda c: truncate(c / "model.safetensors"), "model.safetensors cannot be read"),
        "truncated optimizer": (lambda c: truncate(c / "optimizer.bin"), "optimizer.bin cannot be read"),
        "bad run state": (lambda c: (c / "run_state.json").write_text("{not json"), "run state or data position"),
        "malicious optimizer": (lambda c: (c / "optimizer.bin").write_bytes(pickle.dumps(Payload())), "optimizer.bin"),
        "no optimizer": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
        "no data position": (lambda c: (c / "loader_rank0.json").unlink(), "run state or data position"),
    }
    for name, (hurt, expected) in damage.items():
        copy = tmp_path / name.replace(" ", "_")
        shutil.copytree(source, copy)
        hurt(copy)
        problem = ckpt.checkpoint_problem(copy)
        assert problem is not None and expected in problem, (name, problem)


@pytest.mark.slow
def test_a_stale_export_and_leftovers_of_an_interrupted_save_are_mended_at_start(reference, data_dir, tmp_path):
    """A run killed after committing its last checkpoint and before linking export/ left export/ and export-gpt2/ at
    the previous checkpoint and a .trash- folder: the next start relinks them to the newest checkpoint and cleans
    up, even when there is nothing left to train."""
    from gpt2_repro.base.atomic_io import link_tree

    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    older = run / "checkpoints" / "step_00000012"
    link_tree(older, run / "export", names=ckpt.model_files(older))  # the state such a kill leaves
    link_tree(older / "export-gpt2", run / "export-gpt2")
    (run / "checkpoints" / ".trash-step_00000008").mkdir()
    (run / "checkpoints" / ".tmp-step_00000020").mkdir()
    proc = run_training(["--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "latest"], run)
    assert "export/ and export-gpt2/ were behind" in proc.stdout + proc.stderr
    newest = run / "checkpoints" / "step_00000016"
    for name in os.listdir(run / "export"):
        assert os.path.samefile(run / "export" / name, newest / name), name
    for name in os.listdir(run / "export-gpt2"):
        assert os.path.samefile(run / "export-gpt2" / name, newest / "export-gpt2" / name), name
    assert not list((run / "checkpoints").glob(".*"))


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_skipped_by_latest_and_refused_by_path(reference, data_dir, tmp_path):
    """A truncated model.safetensors in the newest checkpoint: --resume latest says so on one line and resumes the
    older one, which gives the reference's losses; naming the broken one is an error that names the older ones."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    broken = run / "checkpoints" / "step_00000016"
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = expect_exit_2(run_unchecked(["--data_dir", str(data_dir), "--resume", str(broken)], tmp_path / "other"))
    assert f"{broken} cannot be resumed: model.safetensors cannot be read" in line
    assert f"Resume an older one by path: --resume {run / 'checkpoints' / 'step_00000012'}" in line
    args = ["--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "latest"]
    proc = run_training(args, run)
    skipped = [r for r in (proc.stdout + proc.stderr).splitlines() if r.startswith("warning: skipping")]
    assert len(skipped) == 1 and str(broken) in skipped[0] and "model.safetensors cannot be read" in skipped[0]
    assert "resumed from step 12" in proc.stdout + proc.stderr
    losses, _ = read_metrics(run)
    assert losses == read_metrics(reference[0])[0]  # steps 13-16 trained again, exactly
