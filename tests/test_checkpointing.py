"""checkpointing.py: checkpoint folders complete or absent, rotation, resume resolution, metrics trimming."""

import json

import pytest

import checkpointing as ckpt
from atomic_io import write_json_atomic


def test_checkpoints_are_committed_atomically_and_rotated(tmp_path):
    root = tmp_path / "checkpoints"
    stale = ckpt.temp_checkpoint_dir(root, 99)  # what a run killed while saving leaves behind
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x")
    assert ckpt.list_checkpoints(root) == [] and ckpt.resolve_resume("latest", root) is None
    for step in (4, 8, 12):
        tmp = ckpt.temp_checkpoint_dir(root, step)
        tmp.mkdir(parents=True)
        write_json_atomic(tmp / ckpt.TRAINER_STATE, {"step": step})
        assert [s for s, _ in ckpt.list_checkpoints(root)] == [s for s in (4, 8) if s < step][
            -2:
        ]  # tmp unseen
        final = ckpt.commit_checkpoint(tmp, keep_last=2)
        assert final == root / ckpt.checkpoint_name(step) and not tmp.exists()
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [8, 12]
    assert sorted(p.name for p in root.iterdir()) == [
        "step_00000008",
        "step_00000012",
    ]  # leftovers cleaned
    assert ckpt.resolve_resume("latest", root) == root / "step_00000012"
    assert ckpt.resolve_resume(str(root / "step_00000008"), root) == root / "step_00000008"
    assert ckpt.resolve_resume(str(tmp_path), root) == root / "step_00000012"  # a run folder
    assert ckpt.resolve_resume(None, root) is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), root)


def test_truncate_metrics_drops_redone_steps_and_half_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)] + [{"step": 4, "val_loss": 7.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    ckpt.truncate_metrics(path, 4)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in rows if r["step"] <= 4]


def test_model_weights_load_back_exactly_from_both_checkpoint_formats(tmp_path):
    """Today's checkpoints hold save_pretrained's model.safetensors; older ones accelerate's own, whose names carry
    the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`). Both load bit for bit."""
    import torch
    from safetensors.torch import save_file

    from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM

    config = GPT2ReproConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16)
    torch.manual_seed(0)
    trained = GPT2ReproForCausalLM(config)
    trained.save_pretrained(tmp_path / "new")
    legacy = {  # accelerate's layout: the tied LM head dropped, every name prefixed
        f"module._orig_mod.{k}": v.clone()
        for k, v in trained.state_dict().items()
        if k != "lm_head.weight"
    }
    (tmp_path / "old").mkdir()
    save_file(legacy, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    for folder in ("new", "old"):
        torch.manual_seed(1)
        fresh = GPT2ReproForCausalLM(config)
        ckpt.load_model_weights(fresh, tmp_path / folder)
        for (name, a), b in zip(
            trained.state_dict().items(), fresh.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), (folder, name)
        assert fresh.lm_head.weight is fresh.transformer.wte.weight
    other = GPT2ReproForCausalLM(GPT2ReproConfig(n_layer=2, n_head=2, n_embd=32, n_positions=16))
    with pytest.raises(RuntimeError, match="do not fit this model"):
        ckpt.load_model_weights(other, tmp_path / "new")
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        ckpt.load_model_weights(other, tmp_path)


def test_resume_mismatches_name_each_differing_setting():
    config = {
        "model": {"n_layer": 12, "n_embd": 768},
        "data": {"data_dir": "data/a", "seq_len": 1024, "total_batch_tokens": 524288},
        "optim": {"max_lr": 6e-4},
        "run": {"seed": 1337},
    }
    state = {"step": 10, "config": config}
    assert ckpt.resume_mismatches(state, config, "f1", "f1") == []
    changed = {
        **config,
        "model": {"n_layer": 6, "n_embd": 768},
        "data": {"data_dir": "data/b", "seq_len": 512, "total_batch_tokens": 524288},
        "optim": {"max_lr": 3e-4},  # may change on resume
    }
    assert ckpt.resume_mismatches(state, changed, "f1", "f2") == [
        "n_layer: 12 in the checkpoint, 6 now",
        "seq_len: 1024 in the checkpoint, 512 now",
        "data: the training shards are not the checkpoint's (data_dir 'data/a' then, 'data/b' now)",
    ]
    moved = {**config, "data": {**config["data"], "data_dir": "/scratch/a"}}
    assert ckpt.resume_mismatches(state, moved, "f1", "f1") == []  # same shards elsewhere: fine
    old = {"step": 10, "seq_len": 1024}  # a checkpoint from before the config was saved in it
    assert ckpt.resume_mismatches(old, changed, None, "f2") == [
        "seq_len: 1024 in the checkpoint, 512 now"
    ]


def test_a_streamed_run_resumes_only_onto_the_same_stream_cut_the_same_way():
    sharded = {"data": {"data_dir": "data/a", "dataset": None, "seq_len": 64}, "run": {"seed": 1}}
    stream = {"data": {"data_dir": "data/a", "dataset": "HuggingFaceFW/fineweb-edu", "seq_len": 64}}
    stream["data"] |= {"dataset_name": "sample-10BT", "stream_val_tokens": 1000}
    stream["run"] = {"seed": 1}
    state = {"step": 3, "config": stream}
    assert ckpt.resume_mismatches(state, stream, None, None) == []
    assert ckpt.resume_mismatches(state, sharded, None, "f1") == [
        "dataset: 'HuggingFaceFW/fineweb-edu' in the checkpoint, None now"
    ]
    assert ckpt.resume_mismatches({"step": 3, "config": sharded}, stream, "f1", None) == [
        "dataset: None in the checkpoint, 'HuggingFaceFW/fineweb-edu' now"
    ]
    recut = {**stream, "data": {**stream["data"], "stream_val_tokens": 2000, "dataset_name": None}}
    assert ckpt.resume_mismatches(state, recut, None, None) == [
        "dataset_name: 'sample-10BT' in the checkpoint, None now",
        "stream_val_tokens: 1000 in the checkpoint, 2000 now",
    ]


def test_resume_hint_tells_the_truth(tmp_path):
    root = tmp_path / "checkpoints"
    assert "nothing to resume" in ckpt.resume_hint(root)
    tmp = ckpt.temp_checkpoint_dir(root, 4)
    tmp.mkdir(parents=True)
    assert "nothing to resume" in ckpt.resume_hint(root)  # a half-written checkpoint does not count
    ckpt.commit_checkpoint(tmp, keep_last=2)
    assert ckpt.resume_hint(root).endswith("step_00000004 (step 4): continue with --resume latest")
