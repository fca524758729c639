"""checkpointing/folders.py: checkpoint folders complete or absent, rotation, resume resolution, weights read back."""

import pytest

from gpt2_repro.base.atomic_io import write_json_atomic
from gpt2_repro.checkpointing.folders import (
    RUN_STATE,
    checkpoint_name,
    commit_checkpoint,
    list_checkpoints,
    load_model_weights,
    resolve_resume,
    resume_hint,
    temp_checkpoint_dir,
)


def test_checkpoints_are_committed_atomically_and_rotated(tmp_path):
    root = tmp_path / "checkpoints"
    stale = temp_checkpoint_dir(root, 99)  # what a run killed while saving leaves behind
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x")
    assert list_checkpoints(root) == [] and resolve_resume("latest", root) is None
    for step in (4, 8, 12):
        tmp = temp_checkpoint_dir(root, step)
        tmp.mkdir(parents=True)
        write_json_atomic(tmp / RUN_STATE, {"step": step})
        assert [s for s, _ in list_checkpoints(root)] == [s for s in (4, 8) if s < step][-2:]  # tmp unseen
        final = commit_checkpoint(tmp, keep_last=2)
        assert final == root / checkpoint_name(step) and not tmp.exists()
    assert [s for s, _ in list_checkpoints(root)] == [8, 12]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000008", "step_00000012"]  # leftovers cleaned
    assert resolve_resume("latest", root) == root / "step_00000012"
    assert resolve_resume(str(root / "step_00000008"), root) == root / "step_00000008"
    assert resolve_resume(str(tmp_path), root) == root / "step_00000012"  # a run folder
    assert resolve_resume(None, root) is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path / "nowhere"), root)


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
        f"module._orig_mod.{k}": v.clone() for k, v in trained.state_dict().items() if k != "lm_head.weight"
    }
    (tmp_path / "old").mkdir()
    save_file(legacy, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    for folder in ("new", "old"):
        torch.manual_seed(1)
        fresh = GPT2ReproForCausalLM(config)
        load_model_weights(fresh, tmp_path / folder)
        for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
            assert torch.equal(a, b), (folder, name)
        assert fresh.lm_head.weight is fresh.transformer.wte.weight
    other = GPT2ReproForCausalLM(GPT2ReproConfig(n_layer=2, n_head=2, n_embd=32, n_positions=16))
    with pytest.raises(RuntimeError, match="do not fit this model"):
        load_model_weights(other, tmp_path / "new")
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        load_model_weights(other, tmp_path)


def test_resume_hint_tells_the_truth(tmp_path):
    root = tmp_path / "checkpoints"
    assert "nothing to resume" in resume_hint(root)
    tmp = temp_checkpoint_dir(root, 4)
    tmp.mkdir(parents=True)
    assert "nothing to resume" in resume_hint(root)  # a half-written checkpoint does not count
    commit_checkpoint(tmp, keep_last=2)
    assert resume_hint(root).endswith("step_00000004 (step 4): continue with --resume latest")
