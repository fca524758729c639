"""gpt2-repro's components; the entry points (train.py, data_prep.py, evaluate_gpt2.py) and the model
(modeling_gpt2_repro.py) sit at the repository's root, and only they import this package.

Grouped by concern; imports between the groups run one way, down this list (tests/test_layout.py checks it):

training/       accelerator, optim (optimizers, LR schedules), step (one optimizer step), stopping (signals,
                divergence), periodic_eval (evaluation during training), tracking (metrics, TensorBoard, W&B, MFU)
checkpointing/  folders (checkpoint format, readability, commit, rotation), checkpoints (the component: find,
                fit, restore, save, exports, lines of training)
evaluation/     models (loading, checks), scoring (validation loss, HellaSwag), hellaswag (its examples), reports
publishing/     cards (model cards), hub (uploads)
data/           tokenizer, shards (format, integrity), text_stream, prepare (text -> shards), source (the data
                source interface), shard_loader and stream_loader (its two kinds), windows (batches, val set)
base/           errors, atomic_io (whole-or-absent files), lock, cli (one command-line convention), config (the
                typed config), published (reference figures), machine (versions, hardware, Hub), launch, run_folder
                (the run folder's paths and records)

Nothing is imported here: importing a module of the package loads only what that module needs.
"""


def register_auto_classes() -> None:
    """Map model_type "gpt2_repro" to the project's classes for AutoConfig, AutoModel and AutoModelForCausalLM,
    in this process: our checkpoints then load without trust_remote_code, with the project's modeling_gpt2_repro.py.

    Called by the project's loaders (evaluation.load_model), not on importing the model: that file is also every
    checkpoint's remote code, and registering there let one trusted load serve every later folder of this
    model_type, its own code unread and unasked for.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from modeling_gpt2_repro import GPT2ReproConfig, GPT2ReproForCausalLM, GPT2ReproModel

    AutoConfig.register(GPT2ReproConfig.model_type, GPT2ReproConfig, exist_ok=True)
    AutoModel.register(GPT2ReproConfig, GPT2ReproModel, exist_ok=True)
    AutoModelForCausalLM.register(GPT2ReproConfig, GPT2ReproForCausalLM, exist_ok=True)
