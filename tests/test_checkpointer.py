"""checkpointer.py: the model files of a checkpoint, also of a module whose class FSDP swapped."""

from pathlib import Path

import torch

from gpt2_repro.config import load_config
from synthetic import tiny_repro

ROOT = Path(__file__).resolve().parents[1]


def test_a_model_whose_class_fsdp_swapped_saves_as_our_model(tmp_path, gpt2_encoding):
    """FSDP2 replaces a module's class with a subclass defined in torch; the saved folder must still carry
    our modeling file as its remote code, not torch's FSDP sources (seen on a GPU before this was fixed)."""
    from gpt2_repro.checkpointer import save_model_files
    from gpt2_repro.tokenizer import build_hf_tokenizer
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
