"""train.py: real training runs, in subprocesses exactly as a user launches them.

The runs train a tiny GPT-2 (2 layers, width 64) on token shards the tests write with token_data's `write_shard`.
One reference run is shared: the loss-falls, kill-and-resume, two-process, compile, bf16 and export tests all
compare against it. Only the Hub is a stand-in (a fake `HfApi` at the network boundary); the rest is the real code.
GPU tests (marked `gpu`) run the CUDA defaults (bf16, compile, fused AdamW, TF32) and skip on CPU.
"""

import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from conftest import shared_folder
from gpt2_repro import checkpoint as ckpt
from gpt2_repro.config import load_config
from gpt2_repro.errors import ConfigError, DataError
from gpt2_repro.shards import write_shard
from gpt2_repro.stopping import PREEMPTED_EXIT_CODE
from synthetic import hellaswag_examples, learnable_tokens, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


MAX_STEPS = 16


TINY_ARGS = [
    "--config",
    str(ROOT / "configs" / "tiny.yaml"),
    "--n_layer",
    "2",
    "--n_head",
    "4",
    "--n_embd",
    "64",
    "--n_positions",
    "64",
    "--seq_len",
    "32",
    "--micro_batch_size",
    "4",
    "--total_batch_tokens",
    "256",
    "--max_steps",
    str(MAX_STEPS),
    "--warmup_steps",
    "2",
    "--max_lr",
    "1e-2",
    "--min_lr",
    "1e-3",
    "--eval_every",
    "4",
    "--checkpoint_every",
    "4",
    "--keep_last",
    "2",
    "--val_tokens",
    "512",
    "--eval_batch_size",
    "8",
    "--hellaswag_limit",
    "6",
    "--num_samples",
    "1",
    "--sample_tokens",
    "8",
    "--cpu_threads",
    "1",
]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "HF_TOKEN"))}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _train(args: list[str], out: Path, launcher: list[str] | None = None, timeout=300, umask=None, **env):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *TINY_ARGS, *args, "--output_dir", str(out)]
    preexec = None if umask is None else (lambda: os.umask(umask))
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout, preexec_fn=preexec
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(run: Path) -> tuple[dict[int, float], dict[int, dict]]:
    """(step -> training loss, step -> evaluation line) from metrics.jsonl; fails on duplicate steps."""
    losses, evals = {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            assert row["step"] not in losses, f"step {row['step']} logged twice"
            losses[row["step"]] = row["loss"]
        else:
            assert row["step"] not in evals, f"evaluation at step {row['step']} logged twice"
            evals[row["step"]] = row
    return losses, evals


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, gpt2_encoding):
    """Train/val shards of structured token ids (a random Markov chain over 200 GPT-2 ids: learnable)."""

    def make(folder):
        tokens = learnable_tokens(30000)
        write_shard(folder / "test_val_000000.bin", tokens[:4096])
        write_shard(folder / "test_train_000001.bin", tokens[4096:])

    return shared_folder(tmp_path_factory, "shards", make)


@pytest.fixture(scope="session")
def hellaswag_file(tmp_path_factory):
    folder = shared_folder(
        tmp_path_factory, "hellaswag", lambda f: write_jsonl(f / "hellaswag_val.jsonl", hellaswag_examples(6))
    )
    return folder / "hellaswag_val.jsonl"


def _shared_run(tmp_path_factory, name: str, args: list[str], umask=None):
    """(run folder, its output) of one training run made once for the whole session (conftest.shared_folder)."""

    def make(folder):
        proc = _train(args, folder / "run", umask=umask)
        (folder / "stdout.txt").write_text(proc.stdout)
        (folder / "stderr.txt").write_text(proc.stderr)

    folder = shared_folder(tmp_path_factory, name, make)
    output = SimpleNamespace(stdout=(folder / "stdout.txt").read_text(), stderr=(folder / "stderr.txt").read_text())
    return folder / "run", output


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir, hellaswag_file):
    """One uninterrupted single-process run: MAX_STEPS optimizer steps of 2 x 4 x 32 tokens, under umask 002 (a
    group's shared folder)."""
    return _shared_run(
        tmp_path_factory,
        "reference",
        ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)],
        umask=0o002,
    )


# The fast recipe on the same tiny model: Muon for the blocks' matrices, AdamW for the rest, wsd schedule.
MUON_ARGS = ["--optimizer", "muon", "--schedule", "wsd", "--decay_fraction", "0.4"]


@pytest.fixture(scope="session")
def muon_reference(tmp_path_factory, data_dir, hellaswag_file):
    """One uninterrupted single-process run of the fast recipe, like `reference`."""
    args = [*MUON_ARGS, "--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)]
    return _shared_run(tmp_path_factory, "muon_reference", args)


RECIPES = {"adamw": ("reference", []), "muon": ("muon_reference", MUON_ARGS)}


# ---------------------------------------------------------------------------- optimizers (no runs)


@pytest.mark.slow
def test_a_short_run_learns_and_logs_everything(reference):
    run, proc = reference
    losses, evals = _metrics(run)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[MAX_STEPS] < losses[1] - 2.0, losses  # from ~10.8 (uniform over 50257) down
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "tokens"} <= first.keys()
    assert first["tokens"] == 256 and first["lr"] == pytest.approx(1e-2 / 2)
    assert sorted(evals) == [4, 8, 12, 16]
    assert evals[16]["val_loss"] < evals[4]["val_loss"]
    assert 0.0 <= evals[16]["hellaswag_acc_norm"] <= 1.0  # the in-loop HellaSwag ran on the test file
    assert "--- sample 0 at step 16:\nHello, I'm a language model," in proc.stdout + proc.stderr
    assert "has no manifest.json, so its shards cannot be checked" in proc.stdout + proc.stderr  # shards from elsewhere
    # Run folder: resolved config, facts, trackers, rotated checkpoints, exports.
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").optim.max_steps == MAX_STEPS
    info = json.loads((run / "run_info.json").read_text())
    assert info["grad_accum_steps"] == 2 and info["versions"]["accelerate"] and "hardware" in info
    assert "git_commit" in info
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]
    state = ckpt.read_run_state(run / "checkpoints" / "step_00000016")
    assert state["step"] == MAX_STEPS and state["tokens_seen"] == MAX_STEPS * 256 and state["line"] == 1
    # trainer_state.json is transformers' own TrainerState, which tools that read Trainer checkpoints load
    from transformers import TrainerState

    trainer = TrainerState.load_from_json(str(run / "checkpoints" / "step_00000016" / "trainer_state.json"))
    assert trainer.global_step == MAX_STEPS and trainer.num_input_tokens_seen == MAX_STEPS * 256
    assert trainer.max_steps == MAX_STEPS and trainer.log_history[-1]["eval_loss"] == evals[16]["val_loss"]
    card = (run / "export" / "README.md").read_text()
    assert "step 16" in card and f"{evals[16]['val_loss']:.4f}" in card and "trust_remote_code=True" in card


@pytest.mark.slow
def test_export_folders_load_with_auto_classes(reference, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    from gpt2_repro import register_auto_classes
    from gpt2_repro.evaluation import validation_loss

    register_auto_classes()  # our export loads without trust_remote_code in the project's own process
    run, _ = reference
    ours = AutoModelForCausalLM.from_pretrained(run / "export", dtype=torch.float32)
    stock = AutoModelForCausalLM.from_pretrained(run / "export-gpt2", dtype=torch.float32)
    assert type(ours).__name__ == "GPT2ReproForCausalLM" and isinstance(stock, GPT2LMHeadModel)
    tok = AutoTokenizer.from_pretrained(run / "export")
    ids = tok("Hello, I'm a language model,", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits[..., :50257], stock(ids).logits, atol=1e-4)
        out = ours.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, stock.generate(ids, max_new_tokens=8, do_sample=False))
    assert out.shape[1] == ids.shape[1] + 8 and tok.decode(out[0]).startswith("Hello, I'm a language model,")
    # The export holds the final weights: its validation loss is the one logged at the last step.
    _, evals = _metrics(run)
    val = validation_loss(ours, data_dir, val_tokens=512, batch_size=8, seq_len=32)
    assert val == pytest.approx(evals[MAX_STEPS]["val_loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["export", "checkpoints/step_00000012"])
def test_export_and_checkpoints_load_with_trust_remote_code_in_a_fresh_process(reference, tmp_path, folder):
    """The run's export/ and every checkpoint folder load with the Auto classes alone, as Trainer checkpoints do."""
    run, _ = reference
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"folder = {str(run / folder)!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)\n"
        "tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)\n"
        "ids = tok('Hello, I', return_tensors='pt').input_ids\n"
        "out = model.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "assert 'modeling_gpt2_repro' not in sys.modules  # the project's module was never imported\n"
        "print(type(model).__module__, out.shape[1] - ids.shape[1])\n"
    )
    env = _env(PYTHONPATH="")  # the fresh process cannot import the project: it must use the folder's code
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, new_tokens = proc.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and new_tokens == "5"


@pytest.mark.slow
def test_a_checkpoint_stores_the_model_once_and_the_run_exports_link_to_it(reference):
    """The checkpoint root is the model (from_pretrained reads it, resume reads it); export/ hard-links to it;
    the stock export is the only other copy of the weights (another layout: Conv1D, 50,257 rows)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    from gpt2_repro import register_auto_classes

    register_auto_classes()
    run, _ = reference
    newest = run / "checkpoints" / "step_00000016"
    weights = sorted(str(p.relative_to(newest)) for p in newest.rglob("*.safetensors"))
    assert weights == ["export-gpt2/model.safetensors", "model.safetensors"]
    assert not (newest / "export").exists() and (newest / "optimizer.bin").is_file()
    for name in os.listdir(run / "export"):  # every file of the run's export/ is the checkpoint's own
        assert os.path.samefile(run / "export" / name, newest / name), name
    assert {"config.json", "model.safetensors", "modeling_gpt2_repro.py", "tokenizer.json"} <= set(
        os.listdir(run / "export")
    )
    assert not {"optimizer.bin", "trainer_state.json", "run_state.json", "loader_rank0.json"} & set(
        os.listdir(run / "export")
    )
    for name in os.listdir(run / "export-gpt2"):
        assert os.path.samefile(run / "export-gpt2" / name, newest / "export-gpt2" / name), name
    # Names as from_pretrained writes them (no DDP/compile prefixes), the tied LM head stored once.
    names = set(load_file(newest / "model.safetensors"))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert not [n for n in names if n.startswith(("module.", "_orig_mod."))]
    model = AutoModelForCausalLM.from_pretrained(newest, dtype=torch.float32)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert AutoTokenizer.from_pretrained(newest).pad_token == "<|endoftext|>"
    stock = AutoModelForCausalLM.from_pretrained(newest / "export-gpt2", dtype=torch.float32)
    assert isinstance(stock, GPT2LMHeadModel) and stock.generation_config.pad_token_id == 50256
    for card in (newest / "README.md", newest / "export-gpt2" / "README.md"):
        text = card.read_text()
        assert str(run) not in text and str(ROOT) not in text and "/tmp" not in text, card
    # Every file follows the run's umask (002), model.safetensors too (its writer makes it 0600 by itself).
    for folder in (newest, newest / "export-gpt2", run / "export", run / "export-gpt2"):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir() if p.is_file()}
        assert set(modes.values()) == {"0o664"}, (folder, modes)


@pytest.mark.slow
def test_both_exports_generate_in_a_batched_pipeline(reference):
    """pipeline("text-generation", batch_size=2) pads with end-of-text on the left: the same greedy text as
    one prompt at a time, for our export (remote code) and the stock one."""
    from transformers import pipeline

    run, _ = reference
    prompts = ["Hello, I'm a language model,", "The", "A cat sat on the mat and then", "Why"]
    for folder in ("export", "export-gpt2"):
        pipe = pipeline("text-generation", model=str(run / folder), trust_remote_code=True, batch_size=2)
        assert pipe.tokenizer.pad_token_id == pipe.model.generation_config.pad_token_id == 50256
        batched = pipe(prompts, max_new_tokens=6, do_sample=False)
        alone = [pipe(p, max_new_tokens=6, do_sample=False) for p in prompts]
        texts = [b[0]["generated_text"] for b in batched]
        assert texts == [a[0]["generated_text"] for a in alone], folder
        assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, prompts, strict=True))


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

    ref_losses, _ = _metrics(reference[0])
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    wandb_log = tmp_path / "wandb_init.jsonl"
    env = {"PYTHONPATH": str(_fake_wandb(tmp_path / "site")), "FAKE_WANDB_LOG": str(wandb_log)}
    args = ["--data_dir", str(data_dir), "--hellaswag", "false", "--log_with", "tensorboard,wandb"]
    _train([*args, "--resume", str(run / "checkpoints" / "step_00000012")], run, **env)
    _train([*args, "--resume", "latest"], run, **env)  # nothing left to train: starts and stops

    events = EventAccumulator(str(run / "logs" / "gpt2-repro"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]  # the Trainer's namespaces
    assert steps == list(range(1, MAX_STEPS + 1)), steps  # each step once, in order
    values = {e.step: e.value for e in events.Scalars("train/loss")}
    assert values == pytest.approx(ref_losses, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8, 12, 16]
    assert {"train/learning_rate", "train/grad_norm", "train/num_input_tokens_seen"} <= set(events.Tags()["scalars"])

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
    ref_losses, ref_evals = _metrics(reference[0])
    out = tmp_path / "run"
    args = [*TINY_ARGS, *recipe_args, "--data_dir", str(data_dir), "--hellaswag", "false", "--output_dir", str(out)]
    kill_after = random.randint(5, 11)  # anywhere: mid-step, mid-evaluation or mid-checkpoint
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=_env(),
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

    resumed = _train([*recipe_args, "--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "latest"], out)
    losses, evals = _metrics(out)
    assert losses == ref_losses, f"killed after step {kill_after}"  # bit-identical, fp32 on CPU
    assert {s: e["val_loss"] for s, e in evals.items()} == {s: e["val_loss"] for s, e in ref_evals.items()}
    assert "resumed from step" in resumed.stdout + resumed.stderr  # checkpoint 4 was whole before step 5 began
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 16]
    assert not list((out / "checkpoints").glob(".*")), "temporary checkpoint folders left behind"


@pytest.mark.slow
def test_a_muon_run_learns_faster_and_exports_a_stock_gpt2(reference, muon_reference):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    losses, evals = _metrics(muon_reference[0])
    ref_losses, ref_evals = _metrics(reference[0])
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert evals[MAX_STEPS]["val_loss"] < ref_evals[MAX_STEPS]["val_loss"]  # on this learnable chain
    first = json.loads((muon_reference[0] / "metrics.jsonl").read_text().splitlines()[0])
    assert first["muon_lr"] == pytest.approx(0.02 / 2) and first["lr"] == pytest.approx(1e-2 / 2)
    stock = AutoModelForCausalLM.from_pretrained(muon_reference[0] / "export-gpt2")
    assert type(stock) is GPT2LMHeadModel and stock.config.model_type == "gpt2"
    assert torch.isfinite(stock(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_processes_match_one_process_with_the_same_global_batch(
    recipe, request, data_dir, hellaswag_file, tmp_path
):
    """torchrun + gloo: 2 processes x 1 micro-step of 4 x 32 = 1 process x 2 micro-steps, same windows.

    With Muon every process orthogonalizes the same all-reduced gradient: the same update everywhere."""
    fixture, recipe_args = RECIPES[recipe]
    ref_losses, ref_evals = _metrics(request.getfixturevalue(fixture)[0])
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _train(
        [*recipe_args, "--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)],
        out,
        launcher,
        ACCELERATE_USE_CPU="true",
    )
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["grad_accum_steps"] == 1
    losses, evals = _metrics(out)
    assert sorted(losses) == sorted(ref_losses)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
    for step, row in ref_evals.items():
        assert evals[step]["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)
        assert evals[step]["hellaswag_acc_norm"] == row["hellaswag_acc_norm"]
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000016").glob("loader_rank*.json")) == [
        "loader_rank0.json",
        "loader_rank1.json",
    ]


def test_missing_data_is_reported_before_anything_starts(tmp_path):
    import train

    with pytest.raises(ConfigError, match="no training shards in data_dir=.*python data_prep.py"):
        train.main(["--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(reference, data_dir):
    run, _ = reference
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_ARGS, "--data_dir", str(data_dir), "--output_dir", str(run)]
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr and "--resume latest" in again.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]
    assert len(_metrics(run)[0]) == MAX_STEPS


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor needs a C++ compiler")
def test_compiled_training_evaluates_samples_and_exports(reference, data_dir, hellaswag_file, tmp_path):
    """torch.compile (inductor, here on CPU): same losses as eager, and evaluation, sampling and export work."""
    ref_losses, ref_evals = _metrics(reference[0])
    out = tmp_path / "run"
    proc = _train(["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file), "--compile", "true"], out)
    assert json.loads((out / "run_info.json").read_text())["compile"] == "INDUCTOR"
    losses, evals = _metrics(out)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step
    assert evals[MAX_STEPS]["val_loss"] == pytest.approx(ref_evals[MAX_STEPS]["val_loss"], rel=1e-4)
    assert "hellaswag_acc_norm" in evals[MAX_STEPS]
    assert "--- sample 0 at step 16:\nHello, I'm a language model," in proc.stdout + proc.stderr
    assert "has no manifest.json, so its shards cannot be checked" in proc.stdout + proc.stderr  # shards from elsewhere
    from safetensors.torch import load_file

    names = list(load_file(out / "export" / "model.safetensors"))
    assert "lm_head.weight" in names or "transformer.wte.weight" in names
    assert not [k for k in names if "_orig_mod" in k]  # clean names, not the compile wrapper's


def _check_mixed_precision_run(run: Path, proc, reference_run: Path, device: str, steps: int) -> None:
    """A bf16 run of `steps` steps: the CUDA defaults (or CPU autocast) were in force, it tracks the fp32
    reference while their LRs agree, it learns, evaluation, sampling and both exports work, and the exported
    weights are the fp32 master weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    info = json.loads((run / "run_info.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["device"].startswith(device)
    ref_losses, ref_evals = _metrics(reference_run)
    losses, evals = _metrics(run)
    assert sorted(losses) == list(range(1, steps + 1))
    same_lr = range(1, steps + 1) if steps == MAX_STEPS else range(1, 3)  # the warmup ignores max_steps
    for step in same_lr:  # bf16 rounding, not a different computation
        assert losses[step] == pytest.approx(ref_losses[step], rel=0.03), step
    assert losses[steps] < losses[1] - 1.0
    assert evals[steps]["val_loss"] < ref_evals[4]["val_loss"] + 1.0 and "hellaswag_acc_norm" in evals[steps]
    assert f"--- sample 0 at step {steps}:\nHello, I'm a language model," in proc.stdout + proc.stderr
    weights = load_file(run / "export" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    for folder in ("export", "export-gpt2"):
        model = AutoModelForCausalLM.from_pretrained(run / folder, trust_remote_code=True)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits[..., :50257]).all()


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_evaluates_samples_and_exports(reference, data_dir, hellaswag_file, tmp_path):
    """The GPU default mixed precision, run on the CPU's bf16 autocast so its code paths run in CI too."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)]
    short = ["--max_steps", "6", "--eval_every", "6", "--checkpoint_every", "6"]  # bf16 is slow on CPUs
    proc = _train([*args, *short, "--mixed_precision", "bf16"], out)
    _check_mixed_precision_run(out, proc, reference[0], "cpu", steps=6)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_defaults_bf16_compile_fused_adamw(reference, data_dir, hellaswag_file, tmp_path):
    """On a GPU, the defaults: bf16 autocast, torch.compile, TF32, fused AdamW; evaluation, sampling, exports."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)]
    proc = _train(args, out, timeout=600)
    info = json.loads((out / "run_info.json").read_text())
    assert info["compile"] == "INDUCTOR" and info["optimizer_fused"] is True
    _check_mixed_precision_run(out, proc, reference[0], "cuda", steps=MAX_STEPS)


# The real trainer, run as `python train.py` (its __main__ error handling included), with only huggingface_hub's
# HfApi (the network) replaced by a stand-in that records each call; FAKE_HUB_DENY=1 makes it answer 403.
FAKE_HUB_RUNNER = """
import json, os, runpy, sys
from pathlib import Path

import httpx2
from huggingface_hub.errors import HfHubHTTPError

from gpt2_repro import hub

calls = []


class FakeHfApi:
    def whoami(self):
        calls.append(["whoami"])
        return {"name": "me"}

    def create_repo(self, repo_id, **kw):
        calls.append(["create_repo", repo_id, kw])
        if os.environ.get("FAKE_HUB_DENY"):
            request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
            response = httpx2.Response(403, request=request)
            raise HfHubHTTPError("403 Forbidden: no write access to " + repo_id, response=response)

    def create_branch(self, repo_id, **kw):
        calls.append(["create_branch", repo_id, kw])

    def upload_folder(self, repo_id, folder_path, commit_message, **kw):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = (Path(folder_path) / "README.md").read_text()
        calls.append(["upload_folder", repo_id, commit_message, kw, files, card])


if os.environ.get("FAKE_HUB", "1") == "1":
    hub.HfApi = FakeHfApi
sys.argv = [os.environ["TRAIN_PY"], *sys.argv[1:]]
try:
    runpy.run_path(os.environ["TRAIN_PY"], run_name="__main__")
finally:
    Path(os.environ["FAKE_HUB_RECORD"]).write_text(json.dumps(calls))
"""


def _train_with_fake_hub(args: list[str], tmp_path: Path, **env):
    runner = tmp_path / "run_with_fake_hub.py"
    runner.write_text(FAKE_HUB_RUNNER)
    record = tmp_path / "hub_calls.json"
    env = _env(PYTHONPATH=str(ROOT), TRAIN_PY=str(ROOT / "train.py"), FAKE_HUB_RECORD=str(record), **env)
    proc = subprocess.run(
        [sys.executable, str(runner), *TINY_ARGS, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, json.loads(record.read_text()) if record.is_file() else None


@pytest.mark.slow
def test_push_to_hub_uploads_both_exports_in_the_background(data_dir, tmp_path):
    """Login and repo checked at start-up; each checkpoint's export goes to main, the stock one to branch gpt2."""
    token = "hf_" + "NeverPrintMe0123456789"
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--output_dir", str(out), "--max_steps", "4"]
    args += ["--checkpoint_every", "2", "--hellaswag", "false"]
    args += ["--push_to_hub", "me/gpt2-tiny", "--hub_private", "true"]
    proc, calls = _train_with_fake_hub(args, tmp_path, HF_TOKEN=token)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert token not in proc.stdout + proc.stderr
    assert calls[:3] == [  # before any training
        ["whoami"],
        ["create_repo", "me/gpt2-tiny", {"repo_type": "model", "private": True, "exist_ok": True}],
        ["create_branch", "me/gpt2-tiny", {"branch": "gpt2", "repo_type": "model", "exist_ok": True}],
    ]
    uploads = [c for c in calls if c[0] == "upload_folder"]
    main = [c for c in uploads if c[3]["revision"] is None]
    stock = [c for c in uploads if c[3]["revision"] == "gpt2"]
    assert main[-1][2] == stock[-1][2] == "step 4"  # the final exports always go up
    for _, _, _, kw, files, card in main:
        assert {"config.json", "model.safetensors", "modeling_gpt2_repro.py"} <= set(files)
        assert {"README.md", "tokenizer.json", "generation_config.json"} <= set(files)
        assert not {"optimizer.bin", "trainer_state.json"} & set(files) and "delete_patterns" not in kw
        assert 'from_pretrained("me/gpt2-tiny", trust_remote_code=True)' in card
        assert 'revision="gpt2"' in card  # the card points to the stock variant
    for _, _, _, kw, files, card in stock:
        assert "modeling_gpt2_repro.py" not in files and "model.safetensors" in files
        assert kw["delete_patterns"] == "*"  # the branch mirrors the stock export exactly
        assert 'from_pretrained("me/gpt2-tiny", revision="gpt2")' in card
    for *_, card in uploads:  # nothing local in what is published
        assert str(tmp_path) not in card and str(data_dir) not in card and str(ROOT) not in card
    assert not list((out / ".hub-staging").iterdir())


def _assert_refused_at_start(proc, out: Path, message: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert message in errors[0] and "--push_to_hub" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_push_to_hub_without_a_token_fails_before_training(data_dir, tmp_path):
    """The real HfApi, with no token anywhere: it answers before any request (offline is fine)."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--output_dir", str(out), "--push_to_hub", "me/x"]
    env = {"FAKE_HUB": "0", "HF_HOME": str(tmp_path / "hf-home")}
    proc, calls = _train_with_fake_hub(args, tmp_path, **env)
    _assert_refused_at_start(proc, out, "no Hugging Face token found. Log in with `hf auth login`")


@pytest.mark.slow
def test_push_to_hub_without_write_access_fails_before_training(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--output_dir", str(out), "--push_to_hub", "openai/gpt2"]
    proc, calls = _train_with_fake_hub(args, tmp_path, HF_TOKEN="hf_" + "x" * 20, FAKE_HUB_DENY="1")
    _assert_refused_at_start(proc, out, "403 Forbidden")
    assert [c[0] for c in calls] == ["whoami", "create_repo"]


@pytest.mark.slow
def test_gpu_bench_script_runs_on_cpu_with_tiny():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--steps", "2", "--warmup", "1"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("tokens/s:", "MFU:", "peak memory:", "B=4 T=64"):
        assert line in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Long runs that survive: divergence, stop signals, one run per folder, refused resumes, elastic resume.

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@contextlib.contextmanager
def _running(args: list[str], out: Path, launcher: list[str] | None = None, **env):
    """A training run in the background (its own process group, killed whole if the test fails)."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *TINY_ARGS, *args, "--output_dir", str(out)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # Ctrl-C as in a terminal, also when pytest itself runs in the background (`nohup ... &` ignores SIGINT,
        # and an ignored signal stays ignored in every child)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a no-op when everything ended
        proc.communicate()


def _wait_for_step(out: Path, step: int, proc, timeout: float = 240) -> None:
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= step:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run ended or stalled before step {step}")


def _stopped_at(out: Path, output: str, tracebacks: int = 0) -> int:
    """The step a stop request saved: named in the message, the run's last step and its newest checkpoint.

    No traceback of train.py; torchrun's agent prints its own for the signal that reached it (not ours to change).
    """
    found = re.search(r"stopped at step (\d+) \(.*\): checkpoint (\S+) is complete", output)
    assert found, output[-3000:]
    step = int(found.group(1))
    assert max(_metrics(out)[0]) == step  # the step it was on when it agreed to stop, not a later one
    assert ckpt.list_checkpoints(out / "checkpoints")[-1] == (step, Path(found.group(2)))
    assert not list((out / "checkpoints").glob(".*")), "temporary checkpoint folders left behind"
    assert output.count("Traceback") == output.count("SignalException: Process") + tracebacks, output[-3000:]
    return step


def _expect_exit_2(proc_or_result, stderr: str | None = None) -> str:
    """Exit code 2 with exactly one `error:` line and no traceback; returns that line."""
    err = proc_or_result.stderr if stderr is None else stderr
    assert proc_or_result.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _run(args: list[str], out: Path, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_ARGS, *args, "--output_dir", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, **kw)


def _tensors_finite(folder: Path) -> int:
    """Asserts that every tensor of every weights file and optimizer state under `folder` is finite; returns
    how many files it read."""
    from safetensors.torch import load_file

    weights, optimizers = list(folder.rglob("*.safetensors")), list(folder.rglob("optimizer.bin"))
    for f in weights:
        assert all(torch.isfinite(t).all() for t in load_file(f).values()), f
    for f in optimizers:
        moments = torch.load(f, weights_only=True)["state"].values()  # {param: {exp_avg, ...}}
        assert all(torch.isfinite(t).all() for m in moments for t in m.values()), f
    return len(weights) + len(optimizers)


@pytest.mark.slow
def test_divergence_is_caught_and_never_reaches_a_checkpoint_or_export(reference, data_dir, tmp_path):
    """LR 1e6 on a trained model: updates with a non-finite loss or gradient norm are skipped, the run stops after
    --max_bad_steps of them naming the last good checkpoint, and nothing non-finite is ever written."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out, symlinks=True)
    export_before = (out / "export" / "model.safetensors").read_bytes()
    args = ["--data_dir", str(data_dir), "--hellaswag", "false"]
    args += ["--resume", "latest", "--max_steps", "24", "--max_lr", "1e6", "--min_lr", "1"]
    args += ["--max_bad_steps", "3", "--checkpoint_every", "2", "--eval_every", "2"]
    line = _expect_exit_2(_run(args, out))
    assert "training diverged: the loss or gradient norm was not finite at steps" in line
    assert f"the newest checkpoint, {out / 'checkpoints' / 'step_00000016'} (step 16)" in line
    assert "--resume latest --max_lr 500000" in line
    assert "checkpoints/step_00000012" in line  # the older one to try next
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 16]  # none rotated away
    assert (out / "export" / "model.safetensors").read_bytes() == export_before
    assert _tensors_finite(out) >= 6
    rows = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    bad = [r for r in rows if r.get("skipped")]
    assert len(bad) == 3 and all(r["loss"] is None or r["grad_norm"] is None for r in bad)
    attempts = json.loads((out / "run_info.json").read_text())["attempts"]
    assert attempts[-1]["changed"]["max_lr"] == [1e-2, 1e6] and attempts[-1]["start_step"] == 16

    # Weights that turn non-finite within a finite step (a decay factor of -inf) are never saved either.
    args = ["--data_dir", str(data_dir), "--hellaswag", "false"]
    fresh = _run([*args, "--weight_decay", "1e45", "--checkpoint_every", "1"], tmp_path / "fresh")
    line = _expect_exit_2(fresh)
    assert "the weights at step 1 hold NaN or inf" in line and "nothing to resume" in line
    assert not (tmp_path / "fresh" / "checkpoints").exists() and not (tmp_path / "fresh" / "export").exists()

    # A run that reaches max_steps inside a streak shorter than --max_bad_steps (step 1 finite, then every loss
    # not) has diverged too: no final checkpoint or export of weights whose last loss was not finite.
    streak = tmp_path / "streak"
    line = _expect_exit_2(_run([*args, "--max_steps", "8", "--max_lr", "1e6", "--warmup_steps", "1"], streak))
    assert "training diverged" in line and "the run ended inside this streak" in line, line
    assert "--max_lr 500000" in line and "nothing to resume" in line
    assert not (streak / "checkpoints").exists() and not (streak / "export").exists()
    rows = [json.loads(r) for r in (streak / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == list(range(2, 9)) and "val_loss" not in rows[-1]


@pytest.mark.slow
def test_sigterm_saves_the_step_it_is_on_and_the_resume_is_exact(reference, data_dir, tmp_path):
    """One process, stopped three times, each time with a checkpoint at the current step; the resumed losses and
    evaluations are bit-identical to the uninterrupted reference.

    1. `accelerate launch` killed (SIGKILL, the launcher only): train.py sees its launcher exit. Since accelerate 1.16
       the launcher relays train.py's stderr through a pipe that dies with it; the stop message then comes on stdout.
    2. SIGTERM to the launcher only: accelerate 1.16 and later pass it on to train.py (and kill it 5 s later: the
       tiny model saves well within that); older ones do not, and train.py sees its launcher exit.
    3. SIGTERM to train.py itself, run with --debug: exit code 75 (--debug adds the traceback, not another code).
    """
    from accelerate import __version__ as accelerate_version
    from packaging.version import Version

    ref_losses, ref_evals = _metrics(reference[0])
    out = tmp_path / "run"
    data = ["--data_dir", str(data_dir), "--hellaswag", "false"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    with _running(data, out, accelerate) as proc:
        _wait_for_step(out, random.randint(1, 3), proc)  # it notices within a second: steps go on
        proc.send_signal(signal.SIGKILL)  # the launcher only
        stdout, err = proc.communicate(timeout=240)  # returns when train.py, too, closed the pipes
    assert proc.returncode == -signal.SIGKILL and f"the launcher (pid {proc.pid}) exited" in stdout + err
    first = _stopped_at(out, stdout + err)

    forwards = Version(accelerate_version) >= Version("1.16")
    with _running([*data, "--resume", "latest"], out, accelerate) as proc:
        _wait_for_step(out, first + random.randint(1, 2), proc)
        proc.send_signal(signal.SIGTERM)  # the launcher only
        stdout, err = proc.communicate(timeout=240)
    if forwards:  # the launcher exits with 128 + SIGTERM once train.py has
        assert proc.returncode == 128 + signal.SIGTERM and "stopped at step" in err and "SIGTERM received" in err
    else:
        assert proc.returncode == -signal.SIGTERM and f"the launcher (pid {proc.pid}) exited" in err
    second = _stopped_at(out, err)
    assert first < second

    with _running([*data, "--resume", "latest", "--debug"], out) as proc:
        _wait_for_step(out, second + random.randint(1, 2), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    third = _stopped_at(out, err, tracebacks=1)  # --debug: the Stop's own traceback
    assert second < third < MAX_STEPS

    _train([*data, "--resume", "latest"], out)
    losses, evals = _metrics(out)
    assert losses == ref_losses, (first, second, third)
    assert {s: e["val_loss"] for s, e in evals.items()} == {s: e["val_loss"] for s, e in ref_evals.items()}
    attempts = json.loads((out / "run_info.json").read_text())["attempts"]
    assert [a["start_step"] for a in attempts] == [0, first, second, third]


@pytest.mark.slow
def test_sigterm_with_two_processes_and_elastic_resume(reference, data_dir, tmp_path):
    """Two gloo processes. SIGTERM to every process (as srun sends it) stops both at the same step; the run
    continues with one process (2 -> 1); its checkpoint continues with two (1 -> 2), stopped by SIGTERM to
    torchrun's agent alone (which forwards it). Losses match the one-process reference to float noise."""
    ref_losses, _ = _metrics(reference[0])
    out = tmp_path / "run"
    data = ["--data_dir", str(data_dir), "--hellaswag", "false"]
    with _running(data, out, TORCHRUN, ACCELERATE_USE_CPU="true") as proc:
        _wait_for_step(out, random.randint(3, 6), proc)
        for p in [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())]:
            os.kill(p, signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    first = _stopped_at(out, err)
    saved = out / "checkpoints" / ckpt.checkpoint_name(first)
    assert sorted(p.name for p in saved.glob("loader_rank*.json")) == ["loader_rank0.json", "loader_rank1.json"]
    assert ckpt.read_run_state(saved)["num_processes"] == 2

    _train([*data, "--resume", "latest"], out)  # 2 -> 1
    losses, _ = _metrics(out)
    assert sorted(losses) == sorted(ref_losses)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
    attempts = json.loads((out / "run_info.json").read_text())["attempts"]
    assert attempts[-1]["changed"]["num_processes"] == [2, 1]

    other = tmp_path / "other"  # 1 -> 2, from the one-process checkpoint of step 12
    resume = ["--resume", str(out / "checkpoints" / "step_00000012")]
    with _running([*data, *resume], other, TORCHRUN, ACCELERATE_USE_CPU="true") as proc:
        _wait_for_step(other, 1, proc)  # its first line is step 13
        proc.send_signal(signal.SIGTERM)  # torchrun's agent only
        _, err = proc.communicate(timeout=240)
    last = _stopped_at(other, err)
    assert 13 <= last < MAX_STEPS
    for step, loss in _metrics(other)[0].items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-5), step


@pytest.mark.slow
def test_ctrl_c_during_the_stop_checkpoint_keeps_the_previous_one(data_dir, tmp_path):
    """SIGTERM, then SIGINT while that checkpoint is being written: exit 130, the half-written checkpoint is gone,
    the previous one is whole, and the message says so."""
    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--max_steps", "60", "--hellaswag", "false"]
    args += ["--eval_every", "0", "--num_samples", "0", "--log_with", "none"]
    with _running(args, out) as proc:
        _wait_for_step(out, 5, proc)  # checkpoint 4 is whole
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob(".tmp-*")) and time.time() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    newest = out / "checkpoints" / "step_00000004"
    assert f"interrupted: the newest complete checkpoint is {newest} (step 4)" in err
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [4]
    assert not list((out / "checkpoints").glob(".*"))
    assert ckpt.read_run_state(newest)["step"] == 4 and _tensors_finite(newest) >= 3


@pytest.mark.slow
def test_two_runs_cannot_share_a_folder(data_dir, tmp_path):
    """A second run into a busy folder is refused at once, naming the first, and changes nothing; Ctrl-C on the
    first says truthfully that there is nothing to resume yet; then the folder is free."""
    from gpt2_repro.run_folder import RunLock

    out = tmp_path / "run"
    args = ["--data_dir", str(data_dir), "--max_steps", "500", "--checkpoint_every", "0"]
    args += ["--eval_every", "0", "--hellaswag", "false", "--num_samples", "0"]
    with _running(args, out) as first:
        _wait_for_step(out, 2, first)
        written = {name: (out / name).read_bytes() for name in ("config.yaml", "run_info.json")}
        second = _run([*args, "--max_steps", "7"], out)
        line = _expect_exit_2(second)
        assert f"is in use by another run (pid {first.pid} on host" in line
        assert {name: (out / name).read_bytes() for name in written} == written
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-3000:]
    assert "interrupted: no checkpoint was written yet, so there is nothing to resume" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer
    with RunLock(out):  # released with the process
        pass


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
    line = _expect_exit_2(_run(args, run))
    assert "step_00000016 cannot be resumed with these settings: n_layer: 2 in the checkpoint, 3 now;" in line
    assert "seq_len: 32 in the checkpoint, 16 now; data: the training shards are not the checkpoint's" in line
    assert f"--config {run / 'config.yaml'} --resume latest" in line
    assert {name: (run / name).read_bytes() for name in names} == before
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]


def test_help_a_config_error_and_a_refused_start_import_no_torch(data_dir, tmp_path):
    """What answers at once must not wait for torch and transformers (6-7 s of imports): --help, a config error,
    a second run into a folder in use. Checked on what each process imported (python -X importtime)."""
    from gpt2_repro.lock import RunLock

    busy = tmp_path / "busy"
    cases = {
        "--help": ["--help"],
        "config error": ["--max_lr", "-1", "--data_dir", str(data_dir)],
        "folder in use": [*TINY_ARGS, "--data_dir", str(data_dir), "--output_dir", str(busy)],
    }
    with RunLock(busy):
        for name, args in cases.items():
            proc = subprocess.run(
                [sys.executable, "-X", "importtime", str(ROOT / "train.py"), *args],
                cwd=ROOT,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            imported = {
                line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
            }
            assert proc.returncode == (0 if name == "--help" else 2), proc.stderr[-2000:]
            assert not {"torch", "transformers", "accelerate", "datasets"} & imported, name


@pytest.mark.slow
def test_an_unfinished_data_folder_is_refused_with_the_command_that_finishes_it(gpt2_encoding, tmp_path):
    """data_prep.py stopped after a few shards (manifest.json: complete false): training refuses to start on it,
    naming the command that finishes it; once finished, the same command line trains."""
    from gpt2_repro.prepare import PrepConfig, prepare
    from synthetic import FlakyReads, make_texts, write_fineweb_parquet

    source = tmp_path / "source"
    source.mkdir()
    texts = make_texts(160, seed=6, words=(50, 400))
    for i in range(8):
        write_fineweb_parquet(source / f"part_{i:03d}.parquet", texts[i * 20 : (i + 1) * 20])
    data = tmp_path / "data"
    cfg = PrepConfig(
        dataset=str(source), output_dir=str(data), val_tokens=2048, shard_tokens=2000, batch_docs=16, retries=0
    )
    with FlakyReads("part_005", failures=10**9), pytest.raises(DataError):
        prepare(cfg)  # a read that keeps failing: the finished shards stay, the rest is to come
    assert not json.loads((data / "manifest.json").read_text())["complete"]
    line = _expect_exit_2(_run(["--data_dir", str(data), "--hellaswag", "false"], tmp_path / "run"))
    assert f"{data} is unfinished: data_prep.py stopped after" in line and "complete: false" in line, line
    finish = line.split("Finish it first: `")[1].split("`")[0]
    assert finish.startswith("python data_prep.py --dataset ") and "--shard_tokens 2000" in finish
    done = subprocess.run(
        [sys.executable, *finish.split()[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    args = ["--data_dir", str(data), "--hellaswag", "false", "--max_steps", "2", "--eval_every", "0"]
    proc = _run([*args, "--checkpoint_every", "0", "--num_samples", "0"], tmp_path / "run")
    assert proc.returncode == 0 and "every shard matches manifest.json" in proc.stdout + proc.stderr, proc.stderr


@pytest.fixture
def corrupted_data(data_dir, tmp_path):
    """The test shards with a manifest.json, and one bit of the training shard flipped afterwards."""
    from gpt2_repro.shards import file_sha256

    folder = tmp_path / "corrupted"
    shutil.copytree(data_dir, folder)
    files = sorted(folder.glob("*.bin"))
    shards = [{"file": f.name, "tokens": (f.stat().st_size - 1024) // 2, "sha256": file_sha256(f)} for f in files]
    (folder / "manifest.json").write_text(json.dumps({"created_by": "data_prep.py", "shards": shards}))
    raw = bytearray(files[-1].read_bytes())
    raw[5000] ^= 0x01
    files[-1].write_bytes(raw)
    return folder


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
    line = _expect_exit_2(_run(args, out, preexec_fn=preexec))
    assert expected in line, line
    assert a_file.read_text() == "keep me"
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_resume_from_an_older_checkpoint_starts_a_new_line_and_keeps_the_old_one(reference, data_dir, tmp_path):
    """Resuming step 12 while step 16 exists (what the divergence advice suggests) starts line 2: step 16 moves to
    checkpoints/abandoned/ with its metrics lines (nothing is deleted), rotation keeps the new line's checkpoints,
    --resume latest continues the new line, and metrics.jsonl and run_info.json say which line each step is."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    old_16 = (run / "checkpoints" / "step_00000016" / "model.safetensors").read_bytes()
    args = ["--data_dir", str(data_dir), "--hellaswag", "false", "--num_samples", "0", "--checkpoint_every", "2"]
    first = _train([*args, "--resume", str(run / "checkpoints" / "step_00000012"), "--max_lr", "5e-3"], run)
    aside = run / "checkpoints" / "abandoned" / "line-1-after-step_00000012"
    assert (aside / "step_00000016" / "model.safetensors").read_bytes() == old_16  # moved aside, not deleted
    assert [json.loads(r)["step"] for r in (aside / "metrics.jsonl").read_text().splitlines()] == [13, 14, 15, 16, 16]
    assert "line 2 of training starts at step 12" in first.stdout + first.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [14, 16]  # line 2's own
    assert ckpt.read_run_state(run / "checkpoints" / "step_00000016")["line"] == 2
    _, evals = _metrics(run)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("line", 1) for r in rows if r["step"] <= 12} == {1} and {
        r["line"] for r in rows if r["step"] > 12
    } == {2}
    attempts = json.loads((run / "run_info.json").read_text())["attempts"]
    assert attempts[-1]["line"] == 2 and attempts[-1]["abandoned"] == str(aside)
    again = _train([*args, "--resume", "latest", "--max_steps", "18"], run)  # the new line goes on: 16 -> 18
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
    from gpt2_repro.atomic_io import link_tree

    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    older = run / "checkpoints" / "step_00000012"
    link_tree(older, run / "export", names=ckpt.model_files(older))  # the state such a kill leaves
    link_tree(older / "export-gpt2", run / "export-gpt2")
    (run / "checkpoints" / ".trash-step_00000008").mkdir()
    (run / "checkpoints" / ".tmp-step_00000020").mkdir()
    proc = _train(["--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "latest"], run)
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
    line = _expect_exit_2(_run(["--data_dir", str(data_dir), "--resume", str(broken)], tmp_path / "other"))
    assert f"{broken} cannot be resumed: model.safetensors cannot be read" in line
    assert f"Resume an older one by path: --resume {run / 'checkpoints' / 'step_00000012'}" in line
    args = ["--data_dir", str(data_dir), "--hellaswag", "false", "--resume", "latest"]
    proc = _train(args, run)
    skipped = [r for r in (proc.stdout + proc.stderr).splitlines() if r.startswith("warning: skipping")]
    assert len(skipped) == 1 and str(broken) in skipped[0] and "model.safetensors cannot be read" in skipped[0]
    assert "resumed from step 12" in proc.stdout + proc.stderr
    losses, _ = _metrics(run)
    assert losses == _metrics(reference[0])[0]  # steps 13-16 trained again, exactly


# ---------------------------------------------------------------------------------------------------------------
# Training from a text stream (--dataset): a multi-file parquet stream of ~5,500 tokens (conftest.stream_files)

STREAM = ["--stream_val_tokens", "2048", "--stream_shard_tokens", "1000", "--stream_batch_docs", "4"]
QUICK = ["--hellaswag", "false", "--num_samples", "0", "--shuffle", "false"]  # 16 steps: into epoch 2


@pytest.fixture(scope="session")
def streamed(tmp_path_factory, stream_files):
    """One uninterrupted run straight from the stream, shuffle off."""
    return _shared_run(tmp_path_factory, "streamed", ["--dataset", str(stream_files[0]), *STREAM, *QUICK])[0]


@pytest.mark.slow
def test_streamed_training_equals_training_on_shards_of_the_same_source(streamed, stream_files, tmp_path):
    """data_prep.py with the same settings, then train on its shards: the same losses and validation losses."""
    from gpt2_repro import prepare as data_prep

    shards = tmp_path / "shards"
    prep = data_prep.PrepConfig(
        dataset=str(stream_files[0]), output_dir=str(shards), val_tokens=2048, shard_tokens=1000
    )
    data_prep.prepare(prep)
    _train(["--data_dir", str(shards), *QUICK], tmp_path / "run")
    losses, evals = _metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert _metrics(streamed) == (losses, evals)  # bit-identical: the same windows in the same order
    config = load_config(streamed / "config.yaml")
    assert config.data.dataset == str(stream_files[0]) and config.data.stream_val_tokens == 2048
    state = json.loads((streamed / "checkpoints" / "step_00000016" / "loader_rank0.json").read_text())
    assert state["epoch"] == 1 and state["dataset_state"] is not None


@pytest.mark.slow
def test_streamed_training_resumes_exactly_after_sigkill(streamed, stream_files, tmp_path):
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--dataset", str(stream_files[0]), *STREAM, *QUICK, "--output_dir", str(out)]
    kill_after = random.randint(5, 11)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=_env(),
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
    resumed = _train(["--dataset", str(stream_files[0]), *STREAM, *QUICK, "--resume", "latest"], out)
    assert "resumed from step" in resumed.stdout + resumed.stderr
    assert _metrics(out) == _metrics(streamed), f"killed after step {kill_after}"


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
        env=_env(),
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
    done = len(_metrics(out)[0])
    saved = [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]
    assert 4 <= done < MAX_STEPS and saved and max(saved) <= done, (done, saved)
    assert not list((out / "checkpoints").glob(".*")), "a half-written checkpoint was left"
    _train([*args[:-2], "--resume", "latest"], out)
    assert _metrics(out) == _metrics(streamed)


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
        "import train\n"
        "from gpt2_repro.accelerator import make_accelerator\n"
        "cfg = train.parse_args(sys.argv[1:])\n"
        "accelerator = make_accelerator(cfg, Path(cfg.run.output_dir))\n"
        "loader = train.make_loader(cfg, accelerator)\n"
        "windows = [torch.cat([x, y[:, -1:]], 1) for x, y in (loader.next_batch() for _ in range(16))]\n"
        "out = Path(cfg.run.output_dir) / f'rank{accelerator.process_index}.npy'\n"
        "np.save(out, torch.cat(windows).numpy())\n"
        "loader.close()\n"
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [*TINY_ARGS, "--dataset", str(stream_files[0]), *STREAM, *QUICK, "--output_dir", str(tmp_path)]
    proc = subprocess.run(
        [*launcher, str(script), *args],
        cwd=tmp_path,
        env=_env(ACCELERATE_USE_CPU="true"),
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
    line = _expect_exit_2(_run(["--dataset", str(folder), *STREAM, *QUICK], tmp_path / "run"))
    assert f"{folder / 'part_012b.parquet'} holds no rows" in line and "--resume" not in line, line
    assert not (tmp_path / "run" / "config.yaml").exists()
