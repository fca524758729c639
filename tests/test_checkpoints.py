"""checkpointing/checkpoints.py: a resume that does not fit the checkpoint is refused, naming what differs; the model
files of a checkpoint, also of a module whose class FSDP swapped."""

from pathlib import Path

import pytest
import torch

from gpt2_repro.base.config import load_config
from gpt2_repro.checkpointing.checkpoints import resume_mismatches
from synthetic import tiny_repro

ROOT = Path(__file__).resolve().parents[1]


def test_a_model_whose_class_fsdp_swapped_saves_as_our_model(tmp_path, gpt2_encoding):
    """FSDP2 replaces a module's class with a subclass defined in torch; the saved folder must still carry
    our modeling file as its remote code, not torch's FSDP sources (seen on a GPU before this was fixed)."""
    from gpt2_repro.checkpointing.checkpoints import save_model_files
    from gpt2_repro.data.tokenizer import build_hf_tokenizer
    from modeling_gpt2_repro import GPT2ReproForCausalLM

    model = tiny_repro()
    fsdp_api = "torch.distributed.fsdp._fully_shard._fsdp_api"
    model.__class__ = type("FSDPGPT2ReproForCausalLM", (GPT2ReproForCausalLM,), {"__module__": fsdp_api})
    card = {"config": load_config(ROOT / "configs" / "tiny.yaml").to_dict(), "step": 1, "tokens": 1}
    save_model_files(model, tmp_path, build_hf_tokenizer(gpt2_encoding), card)
    assert not list(tmp_path.glob("_fsdp*.py")) and (tmp_path / "modeling_gpt2_repro.py").is_file()
    loaded = GPT2ReproForCausalLM.from_pretrained(tmp_path)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_resume_mismatches_name_each_differing_setting():
    config = {
        "model": {"n_layer": 12, "n_embd": 768},
        "data": {"data_dir": "data/a", "seq_len": 1024, "total_batch_tokens": 524288},
        "optim": {"max_lr": 6e-4},
        "run": {"seed": 1337},
    }
    state = {"step": 10, "config": config}
    shards = {"shards": "f1", "shard_files": [["a_train_000001.bin", 1000], ["a_train_000002.bin", 700]]}
    assert resume_mismatches(state, config, shards, shards) == []
    changed = {
        **config,
        "model": {"n_layer": 6, "n_embd": 768},
        "data": {"data_dir": "data/b", "seq_len": 512, "total_batch_tokens": 524288},
        "optim": {"max_lr": 3e-4},  # may change on resume
    }
    now = {"shards": "f2", "shard_files": [["a_train_000001.bin", 1000], ["a_train_000003.bin", 64]]}
    assert resume_mismatches(state, changed, shards, now) == [
        "n_layer: 12 in the checkpoint, 6 now",
        "seq_len: 1024 in the checkpoint, 512 now",
        "data: the training shards are not the checkpoint's (a_train_000003.bin is new; a_train_000002.bin is gone)",
    ]
    grown = {"shards": "f3", "shard_files": [["a_train_000001.bin", 1000], ["a_train_000002.bin", 900]]}
    assert resume_mismatches(state, config, shards, grown) == [
        "data: the training shards are not the checkpoint's (a_train_000002.bin: 700 tokens then, 900 now)"
    ]
    assert resume_mismatches(state, config, {"shards": "f1"}, now) == [  # a checkpoint saved without the list
        "data: the training shards are not the checkpoint's (their names or sizes changed since it was saved)"
    ]
    moved = {**config, "data": {**config["data"], "data_dir": "/scratch/a"}}
    assert resume_mismatches(state, moved, shards, shards) == []  # same shards elsewhere: fine
    old = {"step": 10, "seq_len": 1024}  # a checkpoint from before the config was saved in it
    assert resume_mismatches(old, changed, None, now) == ["seq_len: 1024 in the checkpoint, 512 now"]


def test_a_streamed_run_resumes_only_onto_the_same_stream_cut_the_same_way():
    sharded = {"data": {"data_dir": "data/a", "dataset": None, "seq_len": 64}, "run": {"seed": 1}}
    stream = {"data": {"data_dir": "data/a", "dataset": "HuggingFaceFW/fineweb-edu", "seq_len": 64}}
    stream["data"] |= {"dataset_name": "sample-10BT", "stream_val_tokens": 1000}
    stream["run"] = {"seed": 1}
    state = {"step": 3, "config": stream}
    assert resume_mismatches(state, stream, None, None) == []
    assert resume_mismatches(state, sharded, None, {"shards": "f1"}) == [
        "dataset: 'HuggingFaceFW/fineweb-edu' in the checkpoint, None now"
    ]
    assert resume_mismatches({"step": 3, "config": sharded}, stream, {"shards": "f1"}, None) == [
        "dataset: None in the checkpoint, 'HuggingFaceFW/fineweb-edu' now"
    ]
    recut = {**stream, "data": {**stream["data"], "stream_val_tokens": 2000, "dataset_name": None}}
    assert resume_mismatches(state, recut, None, None) == [
        "dataset_name: 'sample-10BT' in the checkpoint, None now",
        "stream_val_tokens: 1000 in the checkpoint, 2000 now",
    ]


# Every setting a checkpoint is bound to (README, "A resume that does not fit"), each with another valid value. Listed
# here, not read from RESUME_MUST_MATCH: a key dropped from that list must fail its case below.
MUST_MATCH = {
    "optimizer": "muon",
    "n_layer": 3,
    "n_head": 8,
    "n_embd": 256,
    "n_positions": 256,
    "vocab_size": 50432,
    "seq_len": 64,
    "total_batch_tokens": 4096,
    "seed": 7,
    "shuffle": False,
}
STREAM_MUST_MATCH = {  # and for a stream, which stream and how it is cut
    "dataset": "me/other-corpus",
    "dataset_name": "sample-100BT",
    "dataset_split": "validation",
    "text_column": "content",
    "stream_val_tokens": 200_000_000,
    "stream_shard_tokens": 50_000_000,
    "stream_shuffle_windows": 4096,
}
# What may change on a resume: LRs, schedule, intervals, max_steps, micro-batch, the read settings of a stream.
MAY_CHANGE = {
    "max_lr": 1e-3,
    "min_lr": 1e-5,
    "warmup_steps": 3,
    "max_steps": 300,
    "schedule": "wsd",
    "weight_decay": 0.0,
    "grad_clip": 0.5,
    "micro_batch_size": 4,
    "eval_every": 7,
    "checkpoint_every": 9,
    "keep_last": 5,
    "output_dir": "runs/moved",
    "data_dir": "/scratch/tinyshakespeare",
    "stream_workers": 4,
    "stream_batch_docs": 64,
    "stream_retries": 2,
}
TINY = ROOT / "configs" / "tiny.yaml"
STREAM = {"dataset": "me/corpus", "dataset_name": "main"}


def _flat(config: dict) -> dict:
    return {k: v for section in config.values() for k, v in section.items()}


@pytest.mark.parametrize("key", sorted(MUST_MATCH))
def test_each_setting_a_checkpoint_is_bound_to_is_refused_alone(key):
    saved = load_config(TINY).to_dict()
    now = load_config(TINY, {key: MUST_MATCH[key]}).to_dict()
    shards = {"shards": "f1", "shard_files": [["a_train_000001.bin", 1000]]}
    state = {"step": 4, "config": saved}
    assert resume_mismatches(state, now, shards, shards) == [
        f"{key}: {_flat(saved)[key]!r} in the checkpoint, {MUST_MATCH[key]!r} now"
    ]


@pytest.mark.parametrize("key", sorted(STREAM_MUST_MATCH))
def test_each_setting_a_streamed_checkpoint_is_bound_to_is_refused_alone(key):
    saved = load_config(TINY, STREAM).to_dict()
    now = load_config(TINY, {**STREAM, key: STREAM_MUST_MATCH[key]}).to_dict()
    assert resume_mismatches({"step": 4, "config": saved}, now, None, None) == [
        f"{key}: {_flat(saved)[key]!r} in the checkpoint, {STREAM_MUST_MATCH[key]!r} now"
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_what_may_change_on_a_resume_is_not_refused(stream):
    base = STREAM if stream else {}
    saved = load_config(TINY, base).to_dict()
    shards = None if stream else {"shards": "f1"}
    for key, value in MAY_CHANGE.items():
        if stream and key == "data_dir":
            continue  # a stream has no data_dir (--dataset and --data_dir together are refused)
        now = load_config(TINY, {**base, key: value}).to_dict()
        assert _flat(now)[key] != _flat(saved)[key], key
        assert resume_mismatches({"step": 4, "config": saved}, now, shards, shards) == [], key


@pytest.mark.parametrize(("keep_last", "max_steps", "held"), [(5, 4, 2), (5, 12, 4), (2, 12, 3), (1, 12, 2)])
def test_the_room_asked_at_start_counts_the_checkpoints_held_at_once(tmp_path, keep_last, max_steps, held):
    """A fresh start saving every 4 steps: the saves to come, one more that a stop request may add, and the new one
    written before the oldest of --keep_last is removed, at most keep_last + 1 at once. A model of 16 PB, which no
    disk holds, makes the refusal say how many checkpoints it asked room for."""
    from gpt2_repro.base.errors import RunError
    from gpt2_repro.base.run_folder import RunFolder
    from gpt2_repro.checkpointing.checkpoints import check_room_at_start

    settings = {"n_layer": 1000, "n_embd": 262144, "max_steps": max_steps, "warmup_steps": 2}
    cfg = load_config(ROOT / "configs" / "tiny.yaml", settings | {"checkpoint_every": 4, "keep_last": keep_last})
    with pytest.raises(RunError, match=rf"but room for {held} more checkpoints? \(a new one is written before"):
        check_room_at_start(cfg, RunFolder(tmp_path), None)
