"""train.py's exports and checkpoints as model folders: the Auto classes, remote code, hard links, pipelines."""

import os
import subprocess
import sys

import pytest
import torch

from runs import MAX_STEPS, ROOT, read_metrics, run_env


@pytest.mark.slow
def test_export_folders_load_with_auto_classes(reference, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    from gpt2_repro import register_auto_classes
    from gpt2_repro.evaluation.scoring import validation_loss

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
    _, evals = read_metrics(run)
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
    env = run_env(PYTHONPATH="")  # the fresh process cannot import the project: it must use the folder's code
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
