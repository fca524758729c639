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
import torch

from gpt2_repro.checkpointing import folders as ckpt
from gpt2_repro.data.shards import write_shard
from runs import MAX_STEPS, RECIPES, ROOT, TINY_ARGS, expect_exit_2, read_metrics, run_env, run_training, run_unchecked
from synthetic import learnable_tokens


def _fake_wandb(folder: Path) -> Path:
    """A stand-in for the wandb client (the W&B network boundary): init() records its arguments in FAKE_WANDB_LOG,
    each Run.log() what it would send ({"step", "values"}) in FAKE_WANDB_VALUES."""
    package = folder / "wandb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import json, os\n"
        "class _Config(dict):\n"
        "    def update(self, values, allow_val_change=False):\n"
        "        dict.update(self, values)\n"
        "config = _Config()\n"
        "def _record(variable, row):\n"
        "    with open(os.environ[variable], 'a') as f:\n"
        "        f.write(json.dumps(row) + '\\n')\n"
        "class Run:\n"
        "    def log(self, values, step=None, commit=None):\n"
        "        _record('FAKE_WANDB_VALUES', {'step': step, 'values': values})\n"
        "    def finish(self):\n"
        "        pass\n"
        "def init(**kwargs):\n"
        "    _record('FAKE_WANDB_LOG', kwargs)\n"
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
    shutil.copytree(reference[0], run, symlinks=True)  # as cp -a: checkpoint-N stays a link
    wandb_log, wandb_values = tmp_path / "wandb_init.jsonl", tmp_path / "wandb_log.jsonl"
    env = {"PYTHONPATH": str(_fake_wandb(tmp_path / "site")), "FAKE_WANDB_LOG": str(wandb_log)}
    env["FAKE_WANDB_VALUES"] = str(wandb_values)
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
    # What W&B was sent: the redone steps 13-16 under the Trainer's names, the step lines and the evaluations.
    sent = [json.loads(line) for line in wandb_values.read_text().splitlines()]
    steps = {r["step"]: r["values"] for r in sent if "train/loss" in r["values"]}
    assert sorted(steps) == [13, 14, 15, 16] and {s: v["train/loss"] for s, v in steps.items()} == pytest.approx(
        {s: ref_losses[s] for s in steps}, rel=1e-6
    )
    train_names = {"train/loss", "train/learning_rate", "train/grad_norm", "train/num_input_tokens_seen"}
    train_names |= {"train/tokens_per_second", "train/step_time_ms", "train/line"}
    assert all(set(v) == train_names for v in steps.values()), steps
    assert steps[16]["train/num_input_tokens_seen"] == 16 * 256 and steps[13]["train/line"] == 2
    evaluations = {r["step"]: r["values"] for r in sent if "eval/loss" in r["values"]}
    assert sorted(evaluations) == [16] and set(evaluations[16]) == {"eval/loss"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_sigkill_then_resume_gives_identical_losses(recipe, request, data_dir, tmp_path):
    """Both recipes: every optimizer's state (AdamW's moments, Muon's momentum) is in the checkpoint. The AdamW run is
    killed the moment checkpoint 8's temporary folder appears, while it is being written: the half-written checkpoint
    is never taken, checkpoint 4 is. The Muon run and the --gradient_checkpointing run are killed after a step drawn
    from a seeded generator (mid-step, mid-evaluation or mid-checkpoint); the latter, resumed, gives the losses of the
    reference run without it, bit for bit: recomputing a block in the backward changes no number (fp32 on CPU)."""
    fixture, recipe_args = RECIPES[recipe]
    reference = request.getfixturevalue(fixture)
    ref_losses, ref_evals = read_metrics(reference[0])
    out = tmp_path / "run"
    args = [*TINY_ARGS, *recipe_args, "--data_dir", str(data_dir), "--hellaswag", "false", "--output_dir", str(out)]
    kill_after = random.Random(17).randint(5, 11)
    print("killed", "while checkpoint 8 is written" if recipe == "adamw" else f"after step {kill_after}")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics, writing = out / "metrics.jsonl", out / "checkpoints" / ".tmp-step_00000008"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if recipe == "adamw" and writing.exists():
            break
        if recipe != "adamw" and metrics.is_file() and metrics.read_text().count('"loss"') >= kill_after:
            break
        time.sleep(0.0005 if recipe == "adamw" else 0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count('"loss"')
    assert proc.returncode == -signal.SIGKILL and done < MAX_STEPS, f"run ended before the kill ({done} steps)"
    if recipe == "adamw":  # killed mid-write: the temporary folder stays, checkpoint 8 does not exist
        assert writing.is_dir() and [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [4]

    resumed = run_training(
        [*recipe_args, "--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "latest"], out
    )
    losses, evals = read_metrics(out)
    assert losses == ref_losses, f"killed after step {done}"  # bit-identical, fp32 on CPU
    assert {s: e["val_loss"] for s, e in evals.items()} == {s: e["val_loss"] for s, e in ref_evals.items()}
    assert "resumed from step" in resumed.stdout + resumed.stderr  # checkpoint 4 was whole before step 5 began
    if recipe == "adamw":
        assert "resumed from step 4 " in resumed.stdout + resumed.stderr
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 16]
    assert not list((out / "checkpoints").glob(".*")), "temporary checkpoint folders left behind"
    checkpointing = "--gradient_checkpointing" in recipe_args  # in force, as the model says, and on the card
    assert json.loads((out / "run_info.json").read_text())["gradient_checkpointing"] is checkpointing
    assert ("Activation checkpointing" in (out / "export" / "README.md").read_text()) is checkpointing


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(reference, data_dir, tmp_path):
    run = tmp_path / "run"  # a copy: a run into the shared reference would hold its lock while other tests use it
    shutil.copytree(reference[0], run, symlinks=True)  # as cp -a: checkpoint-N stays a link
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_ARGS, "--data_dir", str(data_dir), "--output_dir", str(run)]
    again = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr and "--resume latest" in again.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]
    assert len(read_metrics(run)[0]) == MAX_STEPS


@pytest.mark.slow
def test_a_resume_with_other_settings_is_refused_before_anything_is_written(reference, data_dir, tmp_path):
    run = tmp_path / "run"  # a copy, as above
    shutil.copytree(reference[0], run, symlinks=True)  # as cp -a: checkpoint-N stays a link
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
    assert f"--config {run / 'config.yaml'} --output_dir {run} --resume latest" in line
    assert {name: (run / name).read_bytes() for name in names} == before
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]


@pytest.mark.slow
def test_a_resume_from_an_older_checkpoint_starts_a_new_line_and_keeps_the_old_one(reference, data_dir, tmp_path):
    """Resuming step 12 while step 16 exists (what the divergence advice suggests) starts line 2: step 16 moves to
    checkpoints/abandoned/ with its metrics lines (nothing is deleted), rotation keeps the new line's checkpoints,
    --resume latest continues the new line, and metrics.jsonl and run_info.json say which line each step is."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run, symlinks=True)
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
    # Line 3 begins at step 14 and stops before it saves a checkpoint of its own (here it has nothing to train;
    # a kill does the same): --resume latest goes on with line 3, not with line 2, whose step 16 was set aside.
    third = run_training([*args, "--resume", str(run / "checkpoints" / "step_00000014"), "--max_steps", "14"], run)
    said = third.stdout + third.stderr
    assert "line 3 of training starts at step 14" in said and "nothing to train: the run is at step 14" in said
    again = run_training([*args, "--resume", "latest"], run)  # line 3 goes on: 14 -> 16
    assert "resumed from step 14" in again.stdout + again.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [14, 16]
    assert ckpt.read_run_state(run / "checkpoints" / "step_00000016")["line"] == 3
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["line"] for r in rows if r["step"] > 14} == {3}
    attempts = json.loads((run / "run_info.json").read_text())["attempts"]
    assert [a["line"] for a in attempts] == [1, 2, 3, 3]
    assert not (run / "checkpoints" / "abandoned" / "line-3-after-step_00000014").exists()


@pytest.mark.slow
def test_a_resume_with_another_micro_batch_at_the_same_total_batch_matches_to_float_noise(
    reference, data_dir, tmp_path
):
    """Checkpoint 12 resumed with --micro_batch_size 2: 4 micro-steps of 2 x 32 tokens per step instead of 2 of 4 x 32,
    the same 256 tokens and the same windows, summed in another order. Steps 13-16 and the validation loss match
    the uninterrupted reference to float noise (README: within 1e-5 relative)."""
    ref_losses, ref_evals = read_metrics(reference[0])
    run = tmp_path / "run"
    shutil.copytree(reference[0], run, symlinks=True)  # as cp -a: checkpoint-N stays a link
    args = ["--data_dir", str(data_dir), "--hellaswag", "false", "--num_samples", "0", "--micro_batch_size", "2"]
    run_training([*args, "--resume", str(run / "checkpoints" / "step_00000012")], run)
    losses, evals = read_metrics(run)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    for step in range(13, MAX_STEPS + 1):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
    assert evals[16]["val_loss"] == pytest.approx(ref_evals[16]["val_loss"], rel=1e-5)
    info = json.loads((run / "run_info.json").read_text())
    assert info["grad_accum_steps"] == 4 and info["attempts"][-1]["changed"]["micro_batch_size"] == [4, 2]


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
    up, even when there is nothing left to train. So for the checkpoint-N link that Trainer's tools look for: a run
    from before it existed gets it, a stale or half-made one is replaced, and a folder of that name is left alone."""
    from transformers.trainer_utils import get_last_checkpoint

    from gpt2_repro.base.atomic_io import link_tree

    run = tmp_path / "run"
    shutil.copytree(reference[0], run, symlinks=True)
    older = run / "checkpoints" / "step_00000012"
    link_tree(older, run / "export", names=ckpt.model_files(older))  # the state such a kill leaves
    link_tree(older / "export-gpt2", run / "export-gpt2")
    (run / "checkpoints" / ".trash-step_00000008").mkdir()
    (run / "checkpoints" / ".tmp-step_00000020").mkdir()
    (run / "checkpoint-16").unlink()  # a run folder written before the link existed, or a kill before it was made
    (run / "checkpoint-12").symlink_to("checkpoints/step_00000012")  # stale
    (run / ".tmp-checkpoint-16").symlink_to("checkpoints/step_00000016")  # half-made
    (run / "checkpoint-3").mkdir()  # not ours to delete
    proc = run_training(["--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "latest"], run)
    assert "export/ and export-gpt2/ were behind" in proc.stdout + proc.stderr
    newest = run / "checkpoints" / "step_00000016"
    for name in os.listdir(run / "export"):
        assert os.path.samefile(run / "export" / name, newest / name), name
    for name in os.listdir(run / "export-gpt2"):
        assert os.path.samefile(run / "export-gpt2" / name, newest / "export-gpt2" / name), name
    assert not list((run / "checkpoints").glob(".*"))
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-16") and os.readlink(run / "checkpoint-16") == str(
        Path("checkpoints") / "step_00000016"
    )
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-16", "checkpoint-3"]


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_skipped_by_latest_and_refused_by_path(reference, data_dir, tmp_path):
    """Checkpoints that cannot resume exactly, newest first: truncated weights (16), random states missing (15), a
    data position that parses but is not one (14), truncated random states (13). --resume auto (litgpt's spelling of
    latest) says so on one line each and resumes step 12, whose unreadable trainer_state.json (which a resume does
    not need) is rewritten with a warning: the reference's losses follow. Naming the broken one is an error that
    names the older ones."""
    from transformers import TrainerState

    run = tmp_path / "run"
    shutil.copytree(reference[0], run, symlinks=True)  # as cp -a: checkpoint-N stays a link
    root = run / "checkpoints"
    damage = {
        15: ("random_states_0.pkl", None, "random_states_0.pkl (the random states of process 0) is missing"),
        14: ("loader_rank0.json", b'{"consumed_windows": "x"}', "loader_rank0.json holds no data position"),
        13: ("random_states_0.pkl", b"\x80\x02", "random_states_0.pkl cannot be read as random states"),
    }
    for step, (name, content, _) in damage.items():
        _linked_copy(reference[0] / "checkpoints" / "step_00000016", root / f"step_{step:08d}")
        _replace(root / f"step_{step:08d}" / name, content)
    broken = root / "step_00000016"
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "step_00000012" / "trainer_state.json").write_text('{"global_step": "twelve"')
    line = expect_exit_2(run_unchecked(["--data_dir", str(data_dir), "--resume", str(broken)], tmp_path / "other"))
    assert f"{broken} cannot be resumed: model.safetensors cannot be read" in line
    assert f"Resume an older one by path: --resume {root / 'step_00000015'}" in line
    args = ["--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "auto"]
    proc = run_training(args, run)
    said = (proc.stdout + proc.stderr).splitlines()
    skipped = [r for r in said if r.startswith("warning: skipping")]
    assert len(skipped) == 4 and str(broken) in skipped[0] and "model.safetensors cannot be read" in skipped[0]
    for (step, (_, _, expected)), warning in zip(damage.items(), skipped[1:], strict=True):
        assert str(root / f"step_{step:08d}") in warning and expected in warning, warning
    mended = [r for r in said if r.startswith(f"warning: {root / 'step_00000012' / 'trainer_state.json'}")]
    assert len(mended) == 1 and "rewritten from run_state.json" in mended[0], said
    assert TrainerState.load_from_json(str(root / "step_00000012" / "trainer_state.json")).global_step == 12
    assert "resumed from step 12" in proc.stdout + proc.stderr
    losses, _ = read_metrics(run)
    assert losses == read_metrics(reference[0])[0]  # steps 13-16 trained again, exactly


def _linked_copy(source: Path, target: Path) -> None:
    """A copy of a run folder or checkpoint of the session's runs whose large files (weights, optimizer and random
    states) are hard links: nothing writes such a file in place, and _replace replaces one with a file of its own."""

    def link_large(src, dst):
        if Path(src).suffix in (".safetensors", ".bin", ".pkl"):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_large)


def _replace(path: Path, content: bytes | None) -> None:
    """Put `content` at `path` as a new file (None: remove it), leaving whatever it was linked to as it was."""
    path.unlink()
    if content is not None:
        path.write_bytes(content)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["run_state", "random_states", "foreign_random_states", "position", "past_the_end"])
def test_a_checkpoint_that_cannot_resume_exactly_is_refused_by_path(case, reference, data_dir, tmp_path):
    """Named by path, each is one error line before anything is written, naming what is wrong and what to resume
    instead: a run state that does not parse (the older checkpoints are named all the same), random states gone
    or not random states (accelerate would go on without them: other dropout masks than an uninterrupted run's),
    a data position that parses but is not one, a checkpoint past --max_steps (how to go on instead)."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (12, 16):
        _linked_copy(reference[0] / "checkpoints" / f"step_{step:08d}", run / "checkpoints" / f"step_{step:08d}")
    newest, older = run / "checkpoints" / "step_00000016", run / "checkpoints" / "step_00000012"
    args, expected = ["--data_dir", str(data_dir), "--resume", str(newest)], "cannot be resumed: "
    if case == "run_state":
        _replace(newest / "run_state.json", b"{not json")
        expected += "its run state or data position cannot be read (JSONDecodeError"
    elif case == "random_states":
        _replace(newest / "random_states_0.pkl", None)
        expected += "random_states_0.pkl (the random states of process 0) is missing or empty"
    elif case == "foreign_random_states":
        torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pkl")
        _replace(newest / "random_states_0.pkl", (tmp_path / "foreign.pkl").read_bytes())
        expected += "random_states_0.pkl cannot be read as random states (KeyError: 'random_state')"
    elif case == "position":
        position = json.loads((newest / "loader_rank0.json").read_text()) | {"consumed_windows": "x"}
        _replace(newest / "loader_rank0.json", json.dumps(position).encode())
        expected += "loader_rank0.json holds no data position that can be resumed (the data position's "
        expected += "'consumed_windows' is 'x', not int)"
    else:
        args += ["--max_steps", "8"]
        expected = "is at step 16, past --max_steps 8: there is nothing to train. To train longer, resume it with "
        expected += "a larger --max_steps (above 16)"
    line = expect_exit_2(run_unchecked(args, run))
    assert f"{newest} " in line and expected in line, line
    if case != "past_the_end":
        assert f"Resume an older one by path: --resume {older}" in line, line
    assert {p.name for p in run.iterdir()} <= {"checkpoints", ".lock"}  # nothing written but the lock


@pytest.mark.slow
def test_a_refused_resume_of_a_moved_run_folder_names_a_command_that_resumes_it(reference, data_dir, tmp_path):
    """The refusal's advice runs the run's own config.yaml, which names the folder the run was started in: moved
    since, the advice also names the folder it is in now (an option given on the command line overrides the
    preset's), so it resumes that one, not a fresh run in the old place."""
    import shlex

    import yaml

    old, run = tmp_path / "started_here", tmp_path / "moved_here"
    _linked_copy(reference[0], run)
    config = yaml.safe_load((reference[0] / "config.yaml").read_text())
    config["run"]["output_dir"] = str(old)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    line = expect_exit_2(run_unchecked(["--data_dir", str(data_dir), "--resume", "latest", "--seq_len", "16"], run))
    advice = shlex.split(line.split("(`")[1].split("`")[0])
    assert advice == ["--config", str(run / "config.yaml"), "--output_dir", str(run), "--resume", "latest"], line
    assert not old.exists()
