"""gpt2-repro's components; the entry points (train.py, data_prep.py, evaluate_gpt2.py) and the model
(modeling_gpt2_repro.py) sit at the repository's root, and only they import this package.

Data:      tokenizer (the GPT-2 BPE), text_stream (datasets as token streams), shards (the shard format and its
           integrity), prepare (text -> shards), loader (batches from shards), stream_loader (batches from a stream)
Training:  config (the typed config), accelerator, optim (optimizers and LR schedules), step (one optimizer step),
           evaluator (periodic evaluation), checkpoint (checkpoint folders, what can be read), checkpointer (saving
           and restoring a run), resume (which checkpoint, whether it fits, lines of training, the export kept
           current), lock (one writer per folder), run_folder (room, data checks, records), run_info (versions,
           hardware, MFU), stopping (signals, divergence), tracking (metrics.jsonl, TensorBoard, W&B)
Evaluation: evaluation (validation loss, HellaSwag scoring, loading models), hellaswag (its examples), reports
           (tables, plots), cards (model cards), hub (reachability, uploads), published (reference figures)
Plumbing:  cli (one command-line convention), errors (every expected error), atomic_io (whole-or-absent files)

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
