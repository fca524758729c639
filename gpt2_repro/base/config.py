"""The training configuration: one typed dataclass per concern, YAML presets, command-line overrides.

Every setting is declared once. The other sections are declared here; the `model:` section is the model's own
config (`GPT2ReproConfig`): the fields a run sets, with its types, defaults and help texts (a test keeps the two
equal), checked by the model itself. `load_config("configs/x.yaml", {"max_steps": "40"})` reads a preset, applies
overrides and validates the result; `parse_args(argv)` does the same from a command line (cli.py: `--<field>
VALUE`, flat names unique across sections, `--a_b` or `--a-b`).

Also here, because they are pure functions of the config: the gradient-accumulation arithmetic, the parameter
count, and the defaults of the shard layout that data_prep.py writes and the streaming loader cuts alike.

Reading a config imports neither torch nor transformers (`train.py --help` and a config error answer at once): the
model checks its values only once every other setting has passed (`TrainConfig.check_model`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import cli
from .atomic_io import write_atomic
from .cli import opt
from .errors import ConfigError

if TYPE_CHECKING:
    from modeling_gpt2_repro import GPT2ReproConfig

GPT2_VOCAB_SIZE = 50257  # the GPT-2 BPE's ids (tokenizer.py says the same; importing it would import tiktoken)
# The layout data_prep.py writes by default, which the streaming loader cuts a stream into the same way.
VAL_TOKENS = 100_000_000  # the validation shard: the source's first tokens (+ 1: shards.val_shard_tokens)
SHARD_TOKENS = 100_000_000  # each training shard
# Consecutive failed reads of a text stream before giving up: 1 + 2 + 4 + ... + 60 + 60 s = about 3 minutes.
READ_RETRIES = 8


@dataclass
class ModelConfig:
    """The model's shape (GPT2ReproConfig's fields of the same names: types, defaults and help)."""

    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads per block")
    n_embd: int = opt(768, "residual stream width")
    n_positions: int = opt(1024, "maximum context length (>= seq_len)")
    vocab_size: int = opt(50304, "embedding rows: GPT-2's 50257 padded to a multiple of 128 for speed")
    dropout: float = opt(0.0, "dropout probability (0 for pretraining, as in the GPT-2 reproductions)")

    def checks(self) -> list[tuple[bool, str]]:
        """(holds, message): the model's own checks (GPT2ReproConfig.check) that need no import, so that a
        command line with an impossible shape answers before torch and transformers are loaded (6-7 s). The
        model checks again when it is built (TrainConfig.check_model); a test keeps the two in agreement."""
        sizes = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
        positive = [(value > 0, f"model.{name}={value} must be a positive integer") for name, value in sizes.items()]
        divisors = [h for h in range(1, min(max(self.n_embd, 0), 64) + 1) if self.n_embd % h == 0]
        return positive + [
            (
                self.n_head <= 0 or self.n_embd % self.n_head == 0,
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: every head needs the "
                f"same width. Pick n_head in {divisors} or change n_embd to a multiple of {self.n_head}",
            ),
            (
                self.vocab_size >= GPT2_VOCAB_SIZE,
                f"model.vocab_size={self.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB_SIZE} ids: "
                f"use {GPT2_VOCAB_SIZE}, or 50304 (padded to a multiple of 128)",
            ),
            (0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)"),
        ]


DEFAULT_DATA_DIR = "data/fineweb-edu-10BT"


@dataclass
class DataConfig:
    """Training data and batch geometry. Tokens per optimizer step = micro_batch_size * seq_len * processes * accum.

    The data is either token shards written by data_prep.py (`data_dir`) or a text stream tokenized on the fly
    (`dataset`, no preparation step), cut the way data_prep.py cuts it: with shuffle off the two give the same
    batches, and the same validation tokens either way.
    """

    data_dir: str = opt(DEFAULT_DATA_DIR, "folder of .bin token shards written by data_prep.py")
    dataset: str | None = opt(
        None,
        "train from this text stream instead of shards: a Hub dataset id or local parquet/jsonl/txt "
        "(a file, folder or glob), tokenized on the fly",
    )
    dataset_name: str | None = opt(None, "--dataset's config; when unset: sample-10BT for FineWeb-Edu, none for others")
    dataset_split: str = opt("train", "--dataset's split")
    text_column: str = opt("text", "--dataset's column holding the documents")
    stream_val_tokens: int = opt(
        VAL_TOKENS,
        "--dataset: its first N + 1 tokens are the validation set (N scored targets), never trained on, as with "
        "data_prep.py --val_tokens N",
    )
    stream_shard_tokens: int = opt(
        SHARD_TOKENS,
        "--dataset: training windows never span a multiple of N tokens after the validation set, "
        "as with data_prep.py --shard_tokens N",
    )
    stream_shuffle_windows: int = opt(
        8192, "--dataset with shuffle: windows are permuted in seeded blocks of this many"
    )
    stream_workers: int = opt(2, "--dataset: tokenizer threads per process")
    stream_batch_docs: int = opt(256, "--dataset: documents per tokenizer task")
    stream_retries: int = opt(
        READ_RETRIES, "--dataset: retries after a transient read error (waiting 1 s, 2 s, ... 60 s)"
    )
    seq_len: int = opt(1024, "tokens per sequence (T)")
    micro_batch_size: int = opt(64, "sequences per forward pass per process (B)")
    total_batch_tokens: int = opt(524288, "tokens per optimizer step, all processes together (2**19 for GPT-2)")
    shuffle: bool = opt(True, "shuffle shard order and windows each epoch (seeded); --dataset: windows within blocks")
    verify_data: bool = opt(
        True, "check each shard's SHA-256 against the data's manifest.json at start-up (main process)"
    )

    def stream_checks(self, val_tokens: int) -> list[tuple[bool, str]]:
        """(holds, message) for the settings of a stream (--dataset) that the other sections bear on: one source
        at a time, and a validation set that holds the evaluation's budget."""
        if self.dataset is None:
            return []
        need = val_tokens // self.seq_len * self.seq_len + 1  # iter_val_batches' windows
        return [
            (
                self.data_dir == DEFAULT_DATA_DIR,
                f"data.dataset={self.dataset!r} and data.data_dir={self.data_dir!r}: train from one "
                "source, a stream (--dataset) or shards (--data_dir), not both",
            ),
            (
                need <= self.stream_val_tokens + 1,  # the validation set: N scored targets + 1 (val_shard_tokens)
                f"eval.val_tokens={val_tokens} needs the first {need} tokens of the stream at "
                f"seq_len={self.seq_len}, more than its validation set "
                f"(data.stream_val_tokens={self.stream_val_tokens}): lower --val_tokens or raise "
                "--stream_val_tokens",
            ),
            (
                self.stream_shard_tokens > self.seq_len,
                f"data.stream_shard_tokens={self.stream_shard_tokens} must exceed seq_len",
            ),
        ]


@dataclass
class OptimConfig:
    """Optimizer and LR schedule.

    optimizer=adamw: AdamW on every parameter (the GPT-2 recipe). optimizer=muon: torch.optim.Muon on the 2-D
    weight matrices inside the transformer blocks (attention and MLP), AdamW (max_lr, betas, eps,
    weight_decay) on the rest: token and position embeddings (the tied LM head is the token embedding),
    LayerNorms and biases. Each group follows the schedule from its own peak LR (max_lr for AdamW, muon_lr for
    Muon) down to the same fraction min_lr / max_lr of it. zero_init_proj, the one init setting, is here because
    it belongs to a recipe, not to the model (a checkpoint or export does not depend on how training began).
    """

    max_steps: int = opt(19073, "optimizer steps; also where the schedule reaches min_lr (10B tokens at 2**19)")
    optimizer: Literal["adamw", "muon"] = opt(
        "adamw", "adamw (every parameter) or muon (the blocks' 2-D weights; AdamW for the rest)"
    )
    schedule: Literal["cosine", "wsd"] = opt(
        "cosine",
        "cosine: warmup, then cosine to min_lr at max_steps; wsd (warmup-stable-decay): warmup, "
        "constant, then down to min_lr over the final decay_fraction of max_steps (decay_shape)",
    )
    decay_fraction: float = opt(0.2, "wsd: the final fraction of max_steps spent cooling down")
    decay_shape: Literal["linear", "sqrt"] = opt(
        "linear", "wsd: the cool-down's shape: linear, or sqrt (1 - sqrt of its progress: a fast drop, a long tail)"
    )
    max_lr: float = opt(6e-4, "peak learning rate of AdamW (with optimizer=muon: the AdamW group's)")
    min_lr: float = opt(6e-5, "final AdamW LR; every group ends at min_lr / max_lr of its own peak")
    warmup_steps: int = opt(715, "linear warmup steps (every group)")
    weight_decay: float = opt(0.1, "AdamW decay, applied to tensors with 2+ dimensions only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    muon_lr: float = opt(0.02, "Muon: peak LR of the blocks' 2-D weights (scaled by muon_adjust_lr_fn)")
    muon_momentum: float = opt(0.95, "Muon: momentum of the gradient average it orthogonalizes")
    muon_momentum_warmup_steps: int = opt(
        0, "Muon: raise momentum linearly from muon_momentum_start to muon_momentum over the first N steps (0 = off)"
    )
    muon_momentum_start: float = opt(0.85, "Muon: momentum at step 0 of muon_momentum_warmup_steps")
    muon_nesterov: bool = opt(True, "Muon: Nesterov momentum")
    muon_ns_steps: int = opt(5, "Muon: Newton-Schulz iterations per step")
    muon_weight_decay: float = opt(0.0, "Muon: decoupled weight decay (param *= 1 - lr * wd)")
    muon_adjust_lr_fn: Literal["original", "match_rms_adamw"] = opt(
        "match_rms_adamw",
        "Muon: per-matrix LR scale: match_rms_adamw (0.2 * sqrt(max dim): AdamW-sized updates) or "
        "original (sqrt(max(1, rows / cols)))",
    )
    zero_init_proj: bool = opt(
        False,
        "start the blocks' output projections (attn.c_proj, mlp.c_proj weights) at zero, so each block starts as "
        "the identity (GPT-2's init: normal, std initializer_range / sqrt(2 n_layer))",
    )
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    max_bad_steps: int = opt(
        10,
        "stop after this many optimizer steps in a row with a non-finite loss or gradient norm (each one's "
        "update is skipped)",
    )

    @property
    def decay_steps(self) -> int:
        """Length of the wsd cool-down: the final decay_fraction of max_steps, rounded, at least one step."""
        return max(1, round(self.decay_fraction * self.max_steps))

    def is_due(self, step: int, every: int) -> bool:
        """Whether something done every `every` steps and at the end (an evaluation, a checkpoint; 0: only at the
        end) is due after optimizer step `step`."""
        return step == self.max_steps or bool(every and step % every == 0)

    def checks(self) -> list[tuple[bool, str]]:
        """(holds, message) for each setting of this section (TrainConfig.validate reports the failures)."""
        decay_steps = self.decay_steps if 0.0 < self.decay_fraction <= 1.0 else 0
        cooldown = self.max_steps - decay_steps
        return [
            (self.max_steps > 0, f"optim.max_steps={self.max_steps} must be positive"),
            (self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0"),
            (
                self.schedule != "cosine" or self.warmup_steps <= self.max_steps,
                f"optim.warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}: the cosine schedule "
                "would never reach its peak LR nor its floor. Lower warmup_steps or raise max_steps",
            ),
            (self.max_lr > 0, f"optim.max_lr={self.max_lr} must be positive"),
            (0.0 <= self.min_lr <= self.max_lr, f"optim.min_lr={self.min_lr} must be in [0, max_lr={self.max_lr}]"),
            (self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0"),
            (
                self.max_bad_steps >= 1,
                f"optim.max_bad_steps={self.max_bad_steps} must be >= 1 (1: stop at the first bad step)",
            ),
            (0.0 < self.decay_fraction <= 1.0, f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]"),
            (
                self.schedule != "wsd" or self.warmup_steps <= cooldown,
                f"optim.warmup_steps={self.warmup_steps} overlaps the wsd cool-down, which starts at "
                f"step {cooldown} (max_steps={self.max_steps} x (1 - decay_fraction="
                f"{self.decay_fraction})): lower warmup_steps or decay_fraction, or raise max_steps",
            ),
            (
                0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0,
                f"optim.beta1={self.beta1} and beta2={self.beta2} must be in [0, 1)",
            ),
            (self.eps > 0, f"optim.eps={self.eps} must be positive"),
            (self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0"),
            (self.muon_lr > 0, f"optim.muon_lr={self.muon_lr} must be positive"),
            (0.0 <= self.muon_momentum < 1.0, f"optim.muon_momentum={self.muon_momentum} must be in [0, 1)"),
            (
                0.0 <= self.muon_momentum_start < 1.0,
                f"optim.muon_momentum_start={self.muon_momentum_start} must be in [0, 1)",
            ),
            (
                self.muon_momentum_warmup_steps >= 0,
                f"optim.muon_momentum_warmup_steps={self.muon_momentum_warmup_steps} must be >= 0",
            ),
            (1 <= self.muon_ns_steps < 100, f"optim.muon_ns_steps={self.muon_ns_steps} must be in [1, 100)"),
            (self.muon_weight_decay >= 0, f"optim.muon_weight_decay={self.muon_weight_decay} must be >= 0"),
        ]


@dataclass
class EvalConfig:
    """Periodic evaluation: validation loss, HellaSwag, a sample."""

    eval_every: int = opt(250, "evaluate every N optimizer steps and at the end (0 = only at the end)")
    val_tokens: int = opt(10485760, "validation token budget, the same whatever the GPU count")
    eval_batch_size: int | None = opt(None, "sequences per eval forward pass (auto: micro_batch_size)", auto=True)
    hellaswag: bool = opt(True, "score HellaSwag when its data can be had (warns once otherwise)")
    hellaswag_file: str | None = opt(None, "local HellaSwag validation jsonl (default: download and cache)")
    hellaswag_limit: int | None = opt(None, "score only the first N HellaSwag examples")
    sample_prompt: str = opt("Hello, I'm a language model,", "prompt of the periodic sample")
    num_samples: int = opt(4, "samples generated at each evaluation (0 = none)")
    sample_tokens: int = opt(32, "new tokens per sample")


@dataclass
class CheckpointConfig:
    """Training states (accelerate save_state), exports, resume and Hub upload."""

    checkpoint_every: int = opt(5000, "save a checkpoint every N optimizer steps and at the end (0 = only at end)")
    keep_last: int = opt(2, "complete checkpoints kept; older ones are deleted once a newer one is whole")
    resume: str | None = opt(
        None,
        "'latest' (newest checkpoint in output_dir, or a fresh start; 'auto', litgpt's spelling, is the same) "
        "or a path",
    )
    push_to_hub: str | None = opt(None, "Hub repo id; export/ is uploaded in the background at each checkpoint")
    hub_private: bool = opt(False, "create the Hub repo as private")

    def __post_init__(self):
        if isinstance(self.resume, str) and self.resume.strip().lower() == "auto":
            self.resume = "latest"  # litgpt's `--resume auto`: the newest checkpoint, or a fresh start


# accelerate's tracker names (accelerate.utils.LoggerType; a test keeps them equal), and "none".
TRACKERS = (
    "tensorboard",
    "wandb",
    "all",
    "none",
    "comet_ml",
    "aim",
    "mlflow",
    "clearml",
    "dvclive",
    "swanlab",
    "trackio",
)


@dataclass
class RunConfig:
    """Where the run goes, and the hardware knobs (precision, compilation, activation checkpointing, threads)."""

    output_dir: str = opt("runs/gpt2-124m", "run folder: metrics.jsonl, checkpoints/, export/, export-gpt2/, logs")
    seed: int = opt(1337, "seed of the model init and of the data shuffling")
    mixed_precision: str = opt("auto", "auto (bf16 on a GPU that has it, else fp32), no, bf16 or fp16")
    compile: bool | None = opt(None, "torch.compile the model (auto: on for CUDA, off on CPU)", auto=True)
    gradient_checkpointing: bool = opt(
        False,
        "activation checkpointing (transformers' own, every block): a block keeps only its input and runs its "
        "forward again in the backward; the same losses, far less activation memory (train.py --plan: how much), "
        "about a third more compute",
    )
    tf32: bool = opt(True, "allow TF32 matmuls on CUDA")
    cpu_threads: int | None = opt(
        None, "CPU runs: torch threads per process (auto: physical cores / processes)", auto=True
    )
    log_with: str = opt(
        "tensorboard",
        "trackers: tensorboard, wandb, all, none, or a comma list (accelerate's names)",
        aliases=("report_to",),  # --report_to: the name Trainer users know
    )
    project_name: str = opt("gpt2-repro", "tracker project name")
    peak_tflops: float | None = opt(None, "peak bf16 TFLOP/s per device for MFU (auto: known-GPU table)", auto=True)
    dist_timeout: int = opt(
        300,
        "seconds a process waits for the others (a collective, the start) before the run stops with an error: "
        "how soon a machine that died or hangs ends the rest; above the main process's longest lone work (a "
        "checkpoint write, the data check)",
    )
    progress_interval: float = opt(
        10.0,
        "output that is not a terminal (a file, nohup, Slurm): seconds between plain progress lines (0: every "
        "step); a terminal gets a progress bar",
    )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """The sections' own checks and the cross-section ones. They import nothing, so a command line answers at
        once; the model's own checks, which import transformers, are `check_model`."""
        data, optim, evals = self.data, self.optim, self.eval
        ckpt, run, n_positions = self.checkpoint, self.run, self.model.n_positions
        trackers = [t.strip() for t in run.log_with.split(",") if t.strip()]
        unknown = [t for t in trackers if t not in TRACKERS]
        checks = [
            *self.model.checks(),
            (data.seq_len <= n_positions, f"data.seq_len={data.seq_len} exceeds model.n_positions={n_positions}"),
            *optim.checks(),
            (
                min(evals.eval_every, ckpt.checkpoint_every, evals.num_samples) >= 0,
                "eval_every, checkpoint_every and num_samples must be >= 0",
            ),
            (ckpt.keep_last >= 1, f"checkpoint.keep_last={ckpt.keep_last} must be >= 1 (the newest is always kept)"),
            (
                min(data.seq_len, data.micro_batch_size, data.total_batch_tokens, evals.val_tokens) > 0,
                "seq_len, micro_batch_size, total_batch_tokens and val_tokens must be positive",
            ),
            (
                run.mixed_precision in ("auto", "no", "bf16", "fp16"),
                f"run.mixed_precision={run.mixed_precision!r}: use auto, no, bf16 or fp16",
            ),
            (evals.sample_tokens >= 1, f"eval.sample_tokens={evals.sample_tokens} must be >= 1"),
            *[
                (value is None or value >= 1, f"{name}={value} must be >= 1 (or none)")
                for name, value in [
                    ("eval.eval_batch_size", evals.eval_batch_size),
                    ("eval.hellaswag_limit", evals.hellaswag_limit),
                    ("run.cpu_threads", run.cpu_threads),
                ]
            ],
            (run.peak_tflops is None or run.peak_tflops > 0, f"run.peak_tflops={run.peak_tflops} must be positive"),
            (run.dist_timeout >= 1, f"run.dist_timeout={run.dist_timeout} must be >= 1 (seconds)"),
            (
                trackers and not unknown,
                f"run.log_with={run.log_with!r}: unknown tracker {', '.join(map(repr, unknown))}; use "
                f"{', '.join(TRACKERS)} or a comma list of them",
            ),
            (run.progress_interval >= 0, f"run.progress_interval={run.progress_interval} must be >= 0"),
            (0 <= run.seed < 2**32, f"run.seed={run.seed} must be in [0, 2**32) (what numpy and torch seed with)"),
            (
                min(data.stream_val_tokens, data.stream_shuffle_windows, data.stream_workers, data.stream_batch_docs)
                >= 1
                and data.stream_retries >= 0,
                "stream_val_tokens, stream_shuffle_windows, stream_workers and stream_batch_docs must be >= 1, "
                "stream_retries >= 0",
            ),
        ]
        checks += data.stream_checks(evals.val_tokens)
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ConfigError("Invalid training config:\n  " + "\n  ".join(errors))
        return self

    def check_model(self) -> TrainConfig:
        """The model's own checks (GPT2ReproConfig's): a ConfigError says what to change."""
        try:
            self.model_config()
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        return self

    def model_config(self) -> GPT2ReproConfig:
        """The model's config (checked by the model itself: a ValueError says what to change)."""
        from modeling_gpt2_repro import GPT2ReproConfig

        return GPT2ReproConfig(**dataclasses.asdict(self.model))


def one_data_source(overrides: dict) -> dict:
    """The overrides, where a data source given there replaces the preset's other one.

    `--dataset` replaces a preset's data_dir (so `--config configs/tiny.yaml --dataset my.txt` streams) and
    `--data_dir` a preset's dataset; giving both on the command line is refused by `validate()`.
    """
    given = lambda key: key in overrides and str(overrides[key]).strip().lower() not in _UNSET
    if given("dataset") and "data_dir" not in overrides:
        return {**overrides, "data_dir": DEFAULT_DATA_DIR}
    if given("data_dir") and "dataset" not in overrides:
        return {**overrides, "dataset": None}
    return overrides


_UNSET = ("none", "null", "")


def load_config(preset: str | Path | None = None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Preset (or the defaults: the 124M recipe) + flat overrides {field: value-or-string}, validated, the model's
    checks included."""
    return cli.build(TrainConfig, preset, one_data_source(overrides or {})).check_model()


TRAIN_DESCRIPTION = "Train GPT-2 with accelerate. Options override the --config preset."


def parse_args(argv: list[str] | None = None, check_model: bool = True) -> TrainConfig:
    """The command line of train.py: `--config FILE --field value ...` -> validated TrainConfig. check_model=False
    leaves the model's own checks to `TrainConfig.check_model`: they import transformers, which --help, a config
    error or a refused start need not wait for."""
    cfg = cli.parse(TrainConfig, argv, TRAIN_DESCRIPTION, adjust=one_data_source)
    return cfg.check_model() if check_model else cfg


def parse_command_line(argv: list[str] | None, extra) -> tuple[TrainConfig, object]:
    """train.py's whole command line: (the config, as parse_args(check_model=False) reads it, and an instance of
    `extra`), where `extra` is a flat dataclass of options that are not part of the config (train.py's --plan and
    its settings: training/memory_plan.PlanOptions), parsed and listed in --help by the same layer (cli.parse)."""
    return cli.parse(TrainConfig, argv, TRAIN_DESCRIPTION, adjust=one_data_source, extra=extra)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved config as a YAML preset (re-runnable with --config)."""
    write_atomic(path, cli.to_yaml(cfg))


# ---- batch arithmetic ------------------------------------------------------------------------------------------


def parameter_count(model) -> int:
    """Parameters of the GPT-2 a `model:` section describes (the LM head is the token embedding): 12 C^2 + 13 C per
    block, the token and position tables, the final LayerNorm."""
    C, L = model.n_embd, model.n_layer
    return model.vocab_size * C + model.n_positions * C + L * (12 * C * C + 13 * C) + 2 * C


def _divisors(n: int) -> list[int]:
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return sorted(set(small + [n // i for i in small]))


def grad_accum_steps(total_batch_tokens: int, micro_batch_size: int, seq_len: int, num_processes: int) -> int:
    """Micro-steps per optimizer step so that micro_batch_size * seq_len * num_processes * accum = total tokens.

    Refuses a combination that does not divide evenly, listing the values of each knob that would work.
    """
    per_micro = micro_batch_size * seq_len * num_processes  # tokens of one micro-step, all processes
    if total_batch_tokens % per_micro == 0:
        return total_batch_tokens // per_micro
    lower = (total_batch_tokens // per_micro) * per_micro
    totals = [t for t in (lower, lower + per_micro) if t > 0]
    per_seq = seq_len * num_processes
    micro = [b for b in _divisors(total_batch_tokens // per_seq) if b <= 4 * micro_batch_size][-6:]
    micro = micro if total_batch_tokens % per_seq == 0 else []
    procs = [p for p in _divisors(total_batch_tokens // (micro_batch_size * seq_len)) if p <= 1024][:8]
    procs = procs if total_batch_tokens % (micro_batch_size * seq_len) == 0 else []
    fixes = [f"--total_batch_tokens {' or '.join(map(str, totals))} (multiples of {per_micro})"]
    if micro:
        fixes.append(f"--micro_batch_size one of {micro}")
    if procs:
        fixes.append(f"a process count among {procs}")
    raise ConfigError(
        f"total_batch_tokens={total_batch_tokens} is not a multiple of micro_batch_size * seq_len * num_processes "
        f"= {micro_batch_size} * {seq_len} * {num_processes} = {per_micro}, so gradient accumulation cannot give "
        f"exactly that many tokens per step. Valid choices: " + "; or ".join(fixes) + "."
    )
