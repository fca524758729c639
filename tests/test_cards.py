"""publishing/cards.py: the model cards of the exports: the run, the reference figures, no local path, results
updated."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_card_states_the_run_and_the_reference_figures(tmp_path):
    import torch
    import transformers
    from huggingface_hub import ModelCard

    from gpt2_repro.base.config import TrainConfig
    from gpt2_repro.base.published import GPT2_124M
    from gpt2_repro.publishing.cards import write_model_card

    config = TrainConfig().to_dict()
    source = {"dataset": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"}
    path = write_model_card(
        tmp_path,
        step=500,
        tokens=500 * 524288,
        config=config,
        val_loss=3.5,
        val_step=500,
        hellaswag_acc_norm=0.2512,
        hellaswag_examples=10042,
        data_source=source,
        repo_id="me/gpt2-repro",
    )
    card = ModelCard.load(path)
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"] and "custom_code" in card.data.tags
    assert card.text.startswith("\n# GPT-2 (124M) trained from scratch on fineweb-edu (sample-10BT)\n")
    assert "step 500 of 19,073" in card.text
    # each figure says what it averages over; GPT-2's published loss sits beside it only on its own data
    val_row = "| validation loss (first 10,485,760 tokens of the validation split, windows of 1,024) | 3.5000 |"
    assert f"{val_row} {GPT2_124M['val_loss']} (10,485,760 tokens of the val shard" in card.text
    assert "| HellaSwag acc_norm (10,042 of 10,042 examples) | 0.2512 |" in card.text
    for section in ("## Evaluation during training", "## Intended use", "## Limitations", "## Framework versions"):
        assert f"\n{section}\n" in card.text, section
    assert (
        f"- PyTorch {torch.__version__}\n" in card.text and f"- Transformers {transformers.__version__}\n" in card.text
    )
    assert "262,144,000 tokens of fineweb-edu (sample-10BT)" in card.text
    assert 'from_pretrained("me/gpt2-repro", trust_remote_code=True)' in card.text
    # the tokenizer too: AutoTokenizer reads the repo's config.json, whose class is the repo's code
    assert 'AutoTokenizer.from_pretrained("me/gpt2-repro", trust_remote_code=True)' in card.text
    assert 'from_pretrained("me/gpt2-repro", revision="gpt2")' in card.text  # the stock variant
    assert "12 layers" in card.text and "context 1024" in card.text
    results = {(r.dataset_type, r.metric_type): r for r in card.data.eval_results}
    loss = results[("HuggingFaceFW/fineweb-edu", "loss")]
    assert loss.metric_value == 3.5 and loss.dataset_config == "sample-10BT"
    hellaswag = results[("Rowan/hellaswag", "acc_norm")]
    assert hellaswag.metric_value == 0.2512 and hellaswag.dataset_split == "validation"
    assert "Activation checkpointing" not in card.text
    config["run"]["gradient_checkpointing"] = True  # --gradient_checkpointing: the card says it
    card = ModelCard.load(write_model_card(tmp_path, step=500, tokens=500 * 524288, config=config))
    assert "- Activation checkpointing (transformers' own, every block run again in the backward)" in card.text


def test_model_card_of_local_data_names_no_local_path(tmp_path):
    """A card is meant to be shared: local data by its file name only, no run folder, a subset labelled."""
    from huggingface_hub import ModelCard

    from gpt2_repro.base.config import TrainConfig
    from gpt2_repro.publishing.cards import write_model_card

    config = TrainConfig().to_dict()
    config["data"]["data_dir"] = str(tmp_path / "private" / "shards")
    data_file = tmp_path / "private" / "corpus.txt"
    source = {"dataset": str(data_file), "builder": "text", "data_files": [str(data_file)]}
    path = write_model_card(
        tmp_path,
        step=16,
        tokens=4096,
        config=config,
        val_loss=6.25,
        hellaswag_acc_norm=0.3,
        hellaswag_examples=100,
        data_source=source,
        stock_gpt2=True,
    )
    text = path.read_text()
    assert str(tmp_path) not in text and "private" not in text
    card = ModelCard.load(path)
    assert card.data.datasets is None and "custom_code" not in card.data.tags
    assert "local text (`corpus.txt`)" in card.text and "# GPT-2 (124M) trained from scratch on corpus\n" in card.text
    val_row = "| validation loss (first 10,485,760 tokens of the validation split, windows of 1,024) | 6.2500 |"
    assert f"{val_row} - (its 3.2924 is on FineWeb-Edu sample-10BT: other text) |" in card.text  # not comparable
    assert "4,096 tokens is a small fraction" in card.text  # a toy says so under Limitations
    assert 'from_pretrained("path/to/this/folder")' in card.text
    # The metadata's dataset type is a Hub id or absent: a local corpus gets no validation-loss entry there.
    splits = {r.metric_type: (r.dataset_type, r.dataset_split) for r in card.data.eval_results}
    assert splits == {"acc_norm": ("Rowan/hellaswag", "validation[:100]")}
    assert "HellaSwag acc_norm (100 of 10,042 examples) | 0.3000 |" in card.text


def test_update_model_card_replaces_the_trainers_results_and_keeps_the_rest(tmp_path):
    from huggingface_hub import ModelCard

    from gpt2_repro.base.config import TrainConfig
    from gpt2_repro.publishing.cards import CARD_START, update_model_card, write_model_card

    source = {"dataset": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"}
    write_model_card(
        tmp_path,
        step=8,
        tokens=1,
        config=TrainConfig().to_dict(),
        val_loss=4.0,
        hellaswag_acc_norm=0.25,
        hellaswag_examples=50,
        data_source=source,
    )
    val = {"value": 3.9, "tokens": 1024, "data_source": source}
    update_model_card(tmp_path, "## Evaluation results\nmeasured", {"acc_norm": 0.28, "acc": 0.27}, val)
    card = ModelCard.load(tmp_path / "README.md")
    got = {(r.dataset_type, r.metric_type): (r.metric_value, r.dataset_split) for r in card.data.eval_results}
    assert got == {
        ("HuggingFaceFW/fineweb-edu", "loss"): (3.9, "validation (first 1,024 tokens, held out)"),
        ("Rowan/hellaswag", "acc_norm"): (0.28, "validation"),
        ("Rowan/hellaswag", "acc"): (0.27, "validation"),
    }
    assert "# GPT-2 (124M) trained from scratch on fineweb-edu (sample-10BT)" in card.text and "measured" in card.text
    # next to the trainer's own evaluation, before the usage; replaced in place the next time
    assert card.text.index("## Evaluation during training") < card.text.index("measured") < card.text.index("## Use")
    update_model_card(tmp_path, "## Evaluation results\nagain", None, None)
    text = ModelCard.load(tmp_path / "README.md").text
    assert "measured" not in text and text.index("again") < text.index("## Use") and text.count(CARD_START) == 1


def test_the_card_of_a_muon_wsd_run_names_them_and_its_metadata_is_the_hubs(tmp_path):
    """The Training section says which optimizers trained what, on which schedule, with how many tokens; the
    metadata reads back through huggingface_hub as model-index results whose dataset types are Hub ids."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    from gpt2_repro.base.config import load_config
    from gpt2_repro.publishing.cards import write_model_card

    config = load_config(ROOT / "configs" / "gpt2_124m_fast.yaml").to_dict()
    source = {"dataset": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"}
    path = write_model_card(
        tmp_path,
        step=12716,
        tokens=12716 * 524288,
        config=config,
        val_loss=3.3,
        val_step=12716,
        hellaswag_acc_norm=0.3,
        hellaswag_examples=10042,
        data_source=source,
        repo_id="me/fast",
    )
    card = ModelCard.load(path)
    training = card.text[card.text.index("## Training") : card.text.index("## Evaluation")]
    assert "Muon (PyTorch's `torch.optim.Muon`" in training and "peak LR 0.001" in training
    assert "AdamW (betas 0.8/0.95" in training and "tied LM head" in training
    assert "warmup-stable-decay" in training and "final 5,086 steps (40%)" in training and "cosine" not in training
    assert "tokens seen: 6,666,846,208 (524,288 per step" in training
    assert "a linear cool-down" in training and "momentum 0.95," in training
    data = card.data.to_dict()
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "fast" and eval_results_to_model_index(name, results) == data["model-index"]
    assert {r.dataset_type for r in results} == {"HuggingFaceFW/fineweb-edu", "Rowan/hellaswag"}
    cosine = load_config(ROOT / "configs" / "gpt2_124m.yaml").to_dict()
    plain = write_model_card(tmp_path / "adamw", step=1, tokens=524288, config=cosine).read_text()
    assert "AdamW (betas 0.9/0.95" in plain and "then cosine to 10% of each peak at step 19,073" in plain
    tuned = {**config, "optim": {**config["optim"], "decay_shape": "sqrt", "muon_momentum_warmup_steps": 300}}
    tuned["optim"]["zero_init_proj"] = True
    text = write_model_card(tmp_path / "tuned", step=1, tokens=524288, config=tuned).read_text()
    assert "a 1 - sqrt cool-down" in text and "momentum 0.85 rising to 0.95 over 300 steps" in text
    assert "output projections at zero" in text and "output projections" not in training
    assert "Muon" not in plain
