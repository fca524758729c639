"""train.py and its helpers: config, batch arithmetic, LR schedule, checkpoints, Hub upload, and real training runs.

The runs train a tiny GPT-2 (2 layers, width 64) on token shards the tests write with data_prep's public
`write_shard`, in subprocesses, exactly as a user launches them. One reference run is shared: the loss-falls,
kill-and-resume, two-process and export tests all compare against it. Only the Hub is a stand-in (a fake `HfApi`
at the network boundary); everything else is the real code.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpointing as ckpt
from hub import HubUploader
from run_info import mfu, peak_bf16_flops
from train_config import (
    ConfigError,
    OptimConfig,
    build_arg_parser,
    config_from_dict,
    grad_accum_steps,
    load_config,
    lr_at,
    parse_args,
)

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 16
# A tiny model and batch: 2 micro-steps of 4 x 32 tokens per optimizer step in one process.
TINY_ARGS = [
    "--config", str(ROOT / "configs" / "tiny.yaml"),
    "--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--n_positions", "64",
    "--seq_len", "32", "--micro_batch_size", "4", "--total_batch_tokens", "256",
    "--max_steps", str(MAX_STEPS), "--warmup_steps", "2", "--max_lr", "1e-2", "--min_lr", "1e-3",
    "--eval_every", "4", "--checkpoint_every", "4", "--keep_last", "2",
    "--val_tokens", "1024", "--eval_batch_size", "8", "--hellaswag_limit", "6",
    "--num_samples", "1", "--sample_tokens", "8",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ config


def test_presets_load_with_the_recipe_numbers():
    cfg = load_config(ROOT / "configs" / "gpt2_124m.yaml")
    d, o, m = cfg.data, cfg.optim, cfg.model
    assert (d.total_batch_tokens, d.micro_batch_size, d.seq_len) == (524288, 64, 1024)
    assert (o.max_lr, o.min_lr, o.warmup_steps, o.max_steps) == (6e-4, 6e-5, 715, 19073)
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (m.n_layer, m.n_head, m.n_embd, m.vocab_size, m.dropout) == (12, 12, 768, 50304, 0.0)
    assert [grad_accum_steps(524288, 64, 1024, p) for p in (1, 2, 4, 8)] == [8, 4, 2, 1]
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert grad_accum_steps(tiny.data.total_batch_tokens, tiny.data.micro_batch_size, tiny.data.seq_len, 1) == 2


def test_cli_overrides_are_typed():
    cfg = parse_args(["--config", str(ROOT / "configs" / "tiny.yaml"), "--max_steps", "40", "--max_lr", "1e-3",
                      "--compile", "false", "--eval_batch_size", "none", "--total_batch_tokens", "4_096",
                      "--push_to_hub", "me/tiny", "--hellaswag", "no"])  # fmt: skip
    assert cfg.optim.max_steps == 40 and cfg.optim.max_lr == 1e-3 and cfg.data.total_batch_tokens == 4096
    assert cfg.run.compile is False and cfg.eval.eval_batch_size is None and cfg.eval.hellaswag is False
    assert cfg.checkpoint.push_to_hub == "me/tiny"
    assert cfg.data.seq_len == 128  # from the preset
    assert parse_args(["--compile", "auto"]).run.compile is None
    options = {a.dest for a in build_arg_parser()._actions}
    assert {"data_dir", "output_dir", "max_steps", "eval_every", "checkpoint_every", "resume", "push_to_hub"} <= options


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"optim": {"max_lrr": 1e-3}}, "unknown key 'max_lrr'. Did you mean 'max_lr'"),
        ({"optimizer": {}}, "unknown key 'optimizer'. Did you mean 'optim'"),
        ({"optim": {"max_lr": "fast"}}, "optim.max_lr: expected float, got 'fast'"),
        ({"optim": {"max_steps": 2.5}}, "optim.max_steps: expected int, got 2.5"),
        ({"data": {"shuffle": 1}}, "data.shuffle: expected bool, got 1"),
        ({"eval": {"eval_every": None}}, "eval.eval_every: expected int, got null"),
        ({"data": "big"}, "section 'data' must be a mapping"),
    ],
)
def test_bad_yaml_is_refused_with_the_key_named(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_from_dict(raw, where="x.yaml")


def test_bad_command_line_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--max_step", "3"])
    assert e.value.code == 2 and "Did you mean --max_steps?" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--micro_batch_size: expected int, got 'x'"):
        parse_args(["--micro_batch_size", "x"])
    with pytest.raises(ConfigError, match="n_embd=100 must be a multiple of model.n_head=12"):
        parse_args(["--n_embd", "100"])
    with pytest.raises(ConfigError, match="seq_len=2048 exceeds model.n_positions=1024"):
        parse_args(["--seq_len", "2048"])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", "configs/nope.yaml"])


def test_auto_precision_and_compile_follow_the_device_and_the_launch_config():
    from train import precision_and_compile

    auto = load_config(ROOT / "configs" / "gpt2_124m.yaml")
    unset = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}  # a bare `accelerate launch`
    assert precision_and_compile(auto, cuda=True, env=unset) == ("bf16", "inductor")
    assert precision_and_compile(auto, cuda=True, env={}) == ("bf16", "inductor")
    assert precision_and_compile(auto, cuda=False, env=unset) == ("no", "no")
    chosen = {"ACCELERATE_MIXED_PRECISION": "fp16", "ACCELERATE_DYNAMO_BACKEND": "EAGER"}  # an accelerate config
    assert precision_and_compile(auto, cuda=True, env=chosen) == ("fp16", "eager")
    explicit = parse_args(["--mixed_precision", "no", "--compile", "false"])
    assert precision_and_compile(explicit, cuda=True, env={}) == ("no", "no")
    assert precision_and_compile(parse_args(["--compile", "true"]), cuda=False, env={}) == ("no", "inductor")


# ---------------------------------------------------------------------------------------- batch arithmetic


def test_grad_accum_arithmetic():
    assert grad_accum_steps(524288, 64, 1024, 1) == 8
    assert grad_accum_steps(524288, 16, 1024, 1) == 32
    assert grad_accum_steps(524288, 32, 1024, 2) == 8
    assert grad_accum_steps(256, 4, 32, 2) == 1


def test_grad_accum_refusals_list_valid_values():
    with pytest.raises(ConfigError) as e:  # 3 GPUs: 64 * 1024 * 3 = 196,608 does not divide 2**19
        grad_accum_steps(524288, 64, 1024, 3)
    msg = str(e.value)
    assert "= 64 * 1024 * 3 = 196608" in msg
    assert "--total_batch_tokens 393216 or 589824" in msg  # the multiples around the request
    assert "a process count among [1, 2, 4, 8]" in msg
    assert "--micro_batch_size" not in msg  # no micro-batch works with 3 processes
    with pytest.raises(ConfigError) as e:  # micro-batch 48 on one GPU
        grad_accum_steps(524288, 48, 1024, 1)
    assert "--micro_batch_size one of [4, 8, 16, 32, 64, 128]" in str(e.value)
    for valid in (393216, 589824):
        assert grad_accum_steps(valid, 64, 1024, 3) in (2, 3)
    with pytest.raises(ConfigError, match="--total_batch_tokens 8192 "):  # fewer tokens than one micro-step
        grad_accum_steps(4096, 8, 1024, 1)


# -------------------------------------------------------------------------------------------- LR schedule


def test_lr_schedule_boundaries():
    o = OptimConfig(max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
    assert lr_at(0, o) == pytest.approx(6e-4 / 715)
    assert lr_at(713, o) == pytest.approx(6e-4 * 714 / 715)
    assert lr_at(714, o) == pytest.approx(6e-4)  # warmup ends at max_lr
    assert lr_at(715, o) == pytest.approx(6e-4)  # cosine starts at max_lr
    assert lr_at((715 + 19073) // 2, o) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)  # half-way
    assert 6e-5 < lr_at(19072, o) < 6e-5 * 1.0001
    assert lr_at(19073, o) == 6e-5 and lr_at(50000, o) == 6e-5  # flat at min_lr after max_steps
    lrs = [lr_at(s, o) for s in range(0, 19100, 7)]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))
    assert lr_at(0, OptimConfig(max_lr=1e-3, min_lr=0.0, warmup_steps=0, max_steps=10)) == 1e-3


# ------------------------------------------------------------------------------------------- MFU table


def test_peak_flops_table_and_mfu():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA A10G") == 70e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12 and peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops("Some Future GPU") is None and peak_bf16_flops(None) is None
    # anchors.md: 124M at T=1024 is ~855M FLOPs/token; 50% MFU on one H100 is ~578K tokens/s.
    assert mfu(855e6, 578e3, 989e12, 1) == pytest.approx(0.5, rel=0.01)
    assert mfu(855e6, 8 * 578e3, 989e12, 8) == pytest.approx(0.5, rel=0.01)
    assert np.isnan(mfu(855e6, 1e3, None, 1))


# ------------------------------------------------------------------------------------- checkpoint folders


def test_checkpoints_are_committed_atomically_and_rotated(tmp_path):
    root = tmp_path / "checkpoints"
    stale = ckpt.temp_checkpoint_dir(root, 99)  # what a run killed while saving leaves behind
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x")
    assert ckpt.list_checkpoints(root) == [] and ckpt.resolve_resume("latest", root) is None
    for step in (4, 8, 12):
        tmp = ckpt.temp_checkpoint_dir(root, step)
        tmp.mkdir(parents=True)
        ckpt.write_json_atomic(tmp / ckpt.TRAINER_STATE, {"step": step})
        assert [s for s, _ in ckpt.list_checkpoints(root)] == [s for s in (4, 8) if s < step][-2:]  # tmp unseen
        final = ckpt.commit_checkpoint(tmp, keep_last=2)
        assert final == root / ckpt.checkpoint_name(step) and not tmp.exists()
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [8, 12]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000008", "step_00000012"]  # leftovers cleaned
    assert ckpt.resolve_resume("latest", root) == root / "step_00000012"
    assert ckpt.resolve_resume(str(root / "step_00000008"), root) == root / "step_00000008"
    assert ckpt.resolve_resume(str(tmp_path), root) == root / "step_00000012"  # a run folder
    assert ckpt.resolve_resume(None, root) is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), root)


def test_link_tree_replaces_a_folder_with_hard_links(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a.txt").write_text("new")
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    ckpt.link_tree(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["a.txt"]
    assert (dst / "a.txt").stat().st_ino == (src / "a.txt").stat().st_ino  # no second copy on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_truncate_metrics_drops_redone_steps_and_half_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)] + [{"step": 4, "val_loss": 7.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    ckpt.truncate_metrics(path, 4)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in rows if r["step"] <= 4]


# -------------------------------------------------------------------------------------------- Hub upload


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi at the network boundary: records what would be sent."""

    def __init__(self, block: threading.Event | None = None, fail_with: str | None = None):
        self.block, self.fail_with = block, fail_with
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        self.repos.append((repo_id, repo_type, private, exist_ok))

    def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
        if self.block is not None:
            self.block.wait(10)
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        files = {p.name: p.read_text() for p in Path(folder_path).iterdir()}
        self.commits.append((repo_id, commit_message, files))


def test_hub_uploader_never_blocks_and_keeps_the_newest(tmp_path):
    release = threading.Event()
    api = FakeHfApi(block=release)
    uploader = HubUploader("me/tiny", tmp_path / "staging", private=True, api=api)
    exports = []
    for step in (1, 2, 3):
        folder = tmp_path / f"export{step}"
        folder.mkdir()
        (folder / "config.json").write_text(f"step {step}")
        exports.append(folder)
    t0 = time.perf_counter()
    uploader.submit(exports[0], "step 1")  # starts uploading, blocked in the fake network
    time.sleep(0.2)
    uploader.submit(exports[1], "step 2")  # waits...
    uploader.submit(exports[2], "step 3")  # ...and is superseded by this one
    assert time.perf_counter() - t0 < 1.0  # submitting never waited for the network
    shutil.rmtree(exports[2])  # rotation deletes checkpoints: the snapshot taken at submit is what goes up
    release.set()
    assert uploader.close(timeout=10)
    assert [c[1] for c in api.commits] == ["step 1", "step 3"]
    assert api.commits[1][2] == {"config.json": "step 3"}
    assert api.repos == [("me/tiny", "model", True, True)]
    assert not any((tmp_path / "staging").iterdir())  # snapshots removed after upload


def test_hub_upload_failure_warns_without_the_token(tmp_path):
    token = "hf_" + "Sekr3tT0kenValue123456"
    api = FakeHfApi(fail_with=f"401 Unauthorized for token {token}")
    uploader = HubUploader("me/tiny", tmp_path / "staging", api=api)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="Hub upload of 'step 5' to me/tiny failed") as warned:
        uploader.submit(tmp_path / "export", "step 5")
        assert uploader.close(timeout=10)
    assert token not in str(warned[0].message) and "hf_***" in str(warned[0].message)
    assert token not in " ".join(uploader.errors) and uploader.uploaded == []


# ------------------------------------------------------------------------------------------ training runs


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE"))}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _train(args: list[str], out: Path, launcher: list[str] | None = None, timeout=300, **env):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *TINY_ARGS, *args, "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)
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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, gpt2_encoding):
    """Train/val shards of structured token ids (a random 2nd-order chain over 200 GPT-2 ids: learnable)."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    vocab = rng.choice(50257, size=200, replace=False)
    nxt = rng.integers(0, len(vocab), size=(len(vocab), 3))  # each token has 3 likely successors
    idx = np.empty(30000, dtype=np.int64)
    idx[0] = 0
    choices = rng.integers(0, 3, size=len(idx))
    for i in range(1, len(idx)):
        idx[i] = nxt[idx[i - 1], choices[i]]
    tokens = vocab[idx]
    from data_prep import write_shard

    write_shard(folder / "test_val_000000.bin", tokens[:4096])
    write_shard(folder / "test_train_000001.bin", tokens[4096:])
    return folder


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    words = ["the", "a", "man", "dog", "runs", "into", "water", "then", "he", "she", "jumps", "over", "ball"]
    rng = random.Random(0)
    sentence = lambda n: " ".join(rng.choices(words, k=n))
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    rows = [{"ctx": sentence(12), "endings": [sentence(rng.randint(2, 6)) for _ in range(4)], "label": i % 4}
            for i in range(6)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, hellaswag_file):
    """One uninterrupted single-process run: MAX_STEPS optimizer steps of 2 x 4 x 32 tokens."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _train(["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)], out)
    return out, proc


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
    # Run folder: resolved config, facts, trackers, rotated checkpoints, exports.
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").optim.max_steps == MAX_STEPS
    info = json.loads((run / "run_info.json").read_text())
    assert info["grad_accum_steps"] == 2 and info["versions"]["accelerate"] and "hardware" in info
    assert "git_commit" in info
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [12, 16]
    state = ckpt.read_trainer_state(run / "checkpoints" / "step_00000016")
    assert state["step"] == MAX_STEPS and state["tokens_seen"] == MAX_STEPS * 256
    card = (run / "export" / "README.md").read_text()
    assert "step 16" in card and f"{evals[16]['val_loss']:.4f}" in card and "trust_remote_code=True" in card


@pytest.mark.slow
def test_export_folders_load_with_auto_classes(reference, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    import evaluate_gpt2
    import modeling_gpt2_repro  # noqa: F401  (registers the Auto classes in this process)

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
    val = evaluate_gpt2.validation_loss(ours, data_dir, val_tokens=1024, batch_size=8, seq_len=32)
    assert val == pytest.approx(evals[MAX_STEPS]["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_export_loads_with_trust_remote_code_in_a_fresh_process(reference, tmp_path):
    run, _ = reference
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"folder = {str(run / 'export')!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)\n"
        "tok = AutoTokenizer.from_pretrained(folder)\n"
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
def test_kill_at_an_arbitrary_step_then_resume_gives_identical_losses(reference, data_dir, hellaswag_file, tmp_path):
    ref_losses, ref_evals = _metrics(reference[0])
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file), "--output_dir", str(out)]
    kill_after = random.randint(5, 11)  # anywhere: mid-step, mid-evaluation or mid-checkpoint
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
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

    resumed = _train(["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file), "--resume", "latest"], out)
    losses, evals = _metrics(out)
    assert losses == ref_losses, f"killed after step {kill_after}"  # bit-identical, fp32 on CPU
    assert {s: e["val_loss"] for s, e in evals.items()} == {s: e["val_loss"] for s, e in ref_evals.items()}
    assert "resumed from step" in resumed.stdout + resumed.stderr  # checkpoint 4 was whole before step 5 began
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [12, 16]
    assert not list((out / "checkpoints").glob(".*")), "temporary checkpoint folders left behind"


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(reference, data_dir, hellaswag_file, tmp_path):
    """torchrun + gloo: 2 processes x 1 micro-step of 4 x 32 = 1 process x 2 micro-steps, same windows."""
    ref_losses, ref_evals = _metrics(reference[0])
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _train(["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)], out, launcher,
           ACCELERATE_USE_CPU="true")  # fmt: skip
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
    from safetensors.torch import load_file

    names = list(load_file(out / "export" / "model.safetensors"))
    assert "lm_head.weight" in names or "transformer.wte.weight" in names
    assert not [k for k in names if "_orig_mod" in k]  # clean names, not the compile wrapper's


@pytest.mark.slow
def test_push_to_hub_uploads_the_export_in_the_background(data_dir, tmp_path):
    """The real trainer with the real uploader; only HfApi (the network) is replaced by a recording fake."""
    token = "hf_" + "NeverPrintMe0123456789"
    record = tmp_path / "hub.json"
    runner = tmp_path / "run_with_fake_hub.py"
    runner.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "import hub, train\n"
        "calls = []\n"
        "class FakeHfApi:\n"
        "    def create_repo(self, repo_id, **kw):\n"
        "        calls.append(['create_repo', repo_id, kw])\n"
        "    def upload_folder(self, repo_id, folder_path, commit_message, **kw):\n"
        "        files = sorted(p.name for p in Path(folder_path).iterdir())\n"
        "        calls.append(['upload_folder', repo_id, commit_message, files])\n"
        "hub.HfApi = FakeHfApi\n"
        "train.main(sys.argv[1:])\n"
        f"Path({str(record)!r}).write_text(json.dumps(calls))\n"
    )
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data_dir", str(data_dir), "--output_dir", str(out), "--max_steps", "4",
            "--checkpoint_every", "2", "--hellaswag", "false", "--push_to_hub", "me/gpt2-tiny",
            "--hub_private", "true"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(runner), *args], cwd=tmp_path, env=_env(HF_TOKEN=token),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert token not in proc.stdout + proc.stderr
    calls = json.loads(record.read_text())
    assert calls[0] == ["create_repo", "me/gpt2-tiny", {"repo_type": "model", "private": True, "exist_ok": True}]
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert uploads[-1][2] == "step 4"  # the final export always goes up (step 2's may be superseded)
    for c in uploads:
        assert {"config.json", "model.safetensors", "modeling_gpt2_repro.py", "README.md", "tokenizer.json"} <= set(
            c[3]
        )
    assert "me/gpt2-tiny" in (out / "export" / "README.md").read_text()
    assert not list((out / ".hub-staging").iterdir())


@pytest.mark.slow
def test_gpu_bench_script_runs_on_cpu_with_tiny():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--steps", "2", "--warmup", "1"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("tokens/s:", "MFU:", "peak memory:", "B=4 T=64"):
        assert line in proc.stdout
