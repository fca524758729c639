"""The training configuration: one typed dataclass per concern, YAML presets, command-line overrides.

Every setting is declared once, here. `load_config("configs/x.yaml", ["--max_steps", "40"])` reads the preset,
applies the overrides and validates the result. The command-line options are generated from the dataclass
fields (`--<field> VALUE`, flat names, unique across sections), so a new field is a new option for free.
YAML presets are nested by section (`model:`, `data:`, ...); an unknown key or a value of the wrong type is an
error that names the key and what would be valid.

Also here, because they are pure functions of the config: the gradient-accumulation arithmetic and the LR schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and what to use instead."""


def _opt(default, help: str):
    """A dataclass field whose help text feeds the generated `--help`."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The network (GPT2ReproConfig fields)."""

    n_layer: int = _opt(12, "transformer blocks")
    n_head: int = _opt(12, "attention heads per block")
    n_embd: int = _opt(768, "residual stream width")
    n_positions: int = _opt(1024, "maximum context length (>= seq_len)")
    vocab_size: int = _opt(50304, "embedding rows: GPT-2's 50257 padded to a multiple of 128 for speed")
    dropout: float = _opt(0.0, "dropout probability (0 for pretraining, as in the GPT-2 reproductions)")


@dataclass
class DataConfig:
    """Token shards and batch geometry. Tokens per optimizer step = micro_batch_size * seq_len * processes * accum."""

    data_dir: str = _opt("data/fineweb-edu-10BT", "folder of .bin token shards written by data_prep.py")
    seq_len: int = _opt(1024, "tokens per sequence (T)")
    micro_batch_size: int = _opt(64, "sequences per forward pass per process (B)")
    total_batch_tokens: int = _opt(524288, "tokens per optimizer step, all processes together (2**19 for GPT-2)")
    shuffle: bool = _opt(True, "shuffle shard order and windows each epoch (seeded)")


@dataclass
class OptimConfig:
    """AdamW and the LR schedule: linear warmup to max_lr, cosine decay to min_lr at max_steps."""

    max_steps: int = _opt(19073, "optimizer steps; also where the cosine reaches min_lr (10B tokens at 2**19)")
    max_lr: float = _opt(6e-4, "peak learning rate")
    min_lr: float = _opt(6e-5, "final learning rate")
    warmup_steps: int = _opt(715, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW decay, applied to tensors with 2+ dimensions only")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = no clipping)")


@dataclass
class EvalConfig:
    """Periodic evaluation: validation loss, HellaSwag, a sample."""

    eval_every: int = _opt(250, "evaluate every N optimizer steps and at the end (0 = only at the end)")
    val_tokens: int = _opt(10485760, "validation token budget, the same whatever the GPU count")
    eval_batch_size: int | None = _opt(None, "sequences per eval forward pass (default: micro_batch_size)")
    hellaswag: bool = _opt(True, "score HellaSwag when its data can be had (warns once otherwise)")
    hellaswag_file: str | None = _opt(None, "local HellaSwag validation jsonl (default: download and cache)")
    hellaswag_limit: int | None = _opt(None, "score only the first N HellaSwag examples")
    sample_prompt: str = _opt("Hello, I'm a language model,", "prompt of the periodic sample")
    num_samples: int = _opt(4, "samples generated at each evaluation (0 = none)")
    sample_tokens: int = _opt(32, "new tokens per sample")


@dataclass
class CheckpointConfig:
    """Training states (accelerate save_state), exports, resume and Hub upload."""

    checkpoint_every: int = _opt(5000, "save a checkpoint every N optimizer steps and at the end (0 = only at end)")
    keep_last: int = _opt(2, "complete checkpoints kept; older ones are deleted once a newer one is whole")
    resume: str | None = _opt(None, "'latest' (newest checkpoint in output_dir, or a fresh start) or a path")
    push_to_hub: str | None = _opt(None, "Hub repo id; export/ is uploaded in the background at each checkpoint")
    hub_private: bool = _opt(False, "create the Hub repo as private")


@dataclass
class RunConfig:
    """Where the run goes, and the hardware knobs."""

    output_dir: str = _opt("runs/gpt2-124m", "run folder: metrics.jsonl, checkpoints/, export/, export-gpt2/, logs")
    seed: int = _opt(1337, "seed of the model init and of the data shuffling")
    mixed_precision: str = _opt("auto", "auto (bf16 on a GPU that has it, else fp32), no, bf16 or fp16")
    compile: bool | None = _opt(None, "torch.compile the model (default: on for CUDA, off on CPU)")
    tf32: bool = _opt(True, "allow TF32 matmuls on CUDA")
    cpu_threads: int | None = _opt(None, "CPU runs: torch threads per process (default: physical cores / processes)")
    log_with: str = _opt("tensorboard", "trackers: tensorboard, wandb, all, none, or a comma list")
    project_name: str = _opt("gpt2-repro", "tracker project name")
    peak_tflops: float | None = _opt(None, "peak bf16 TFLOP/s per device for MFU (default: known-GPU table)")


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
        m, d, o, e, c, r = self.model, self.data, self.optim, self.eval, self.checkpoint, self.run
        checks = [
            (m.n_embd % m.n_head == 0, f"model.n_embd={m.n_embd} must be a multiple of model.n_head={m.n_head}"),
            (d.seq_len <= m.n_positions, f"data.seq_len={d.seq_len} exceeds model.n_positions={m.n_positions}"),
            (m.vocab_size >= 50257, f"model.vocab_size={m.vocab_size} is below GPT-2's 50257 tokens"),
            (0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)"),
            (o.max_steps > 0, f"optim.max_steps={o.max_steps} must be positive"),
            (o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0"),
            (0.0 <= o.min_lr <= o.max_lr, f"optim.min_lr={o.min_lr} must be in [0, max_lr={o.max_lr}]"),
            (o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0"),
            (min(e.eval_every, c.checkpoint_every, e.num_samples) >= 0, "eval_every, checkpoint_every and "
             "num_samples must be >= 0"),
            (c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be >= 1 (the newest is always kept)"),
            (min(d.seq_len, d.micro_batch_size, d.total_batch_tokens, e.val_tokens) > 0,
             "seq_len, micro_batch_size, total_batch_tokens and val_tokens must be positive"),
            (r.mixed_precision in ("auto", "no", "bf16", "fp16"),
             f"run.mixed_precision={r.mixed_precision!r}: use auto, no, bf16 or fp16"),
        ]  # fmt: skip
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ConfigError("Invalid training config:\n  " + "\n  ".join(errors))
        return self


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in SECTIONS}


def _field_index() -> dict[str, tuple[str, dataclasses.Field, object]]:
    """Flat option name -> (section, field, resolved type). Names must be unique across sections."""
    index = {}
    for section, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise RuntimeError(f"config field {f.name!r} is declared in both {index[f.name][0]} and {section}")
            index[f.name] = (section, f, hints[f.name])
    return index


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:  # X | None
        return f"{args[0].__name__} or null"
    return tp.__name__


def _coerce(value, tp, where: str):
    """Check (YAML) or convert (command-line strings) `value` to the field type `tp`; clear error otherwise."""
    optional = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null"):
        return None
    if isinstance(value, str) and not issubclass(base, str):
        text = value.strip()
        if optional and text.lower() in ("auto", ""):
            return None
        try:
            if base is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                return lowered in ("true", "1", "yes", "on")
            if base is int:
                as_float = float(text.replace("_", ""))
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)  # accepts 5e5 and 524_288
            return base(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}") from None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got null")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _unknown(key: str, valid, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}.{hint} Valid keys: {', '.join(sorted(valid))}")


def config_from_dict(raw: dict, where: str = "config") -> TrainConfig:
    """A TrainConfig from a nested dict (YAML), checking every key and type; missing keys keep their defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    cfg = TrainConfig()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS, where)
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                raise _unknown(key, hints, f"{where} [{section}]")
            setattr(target, key, _coerce(value, hints[key], f"{where}: {section}.{key}"))
    return cfg


def build_arg_parser() -> argparse.ArgumentParser:
    """`--config FILE` plus one `--<field>` option per config field (values parsed by the field's type)."""
    parser = argparse.ArgumentParser(
        description="Train GPT-2 with accelerate. Options override the YAML preset given with --config.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML preset (configs/gpt2_124m.yaml, configs/tiny.yaml)")
    for name, (section, f, tp) in _field_index().items():
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            f"--{name}", metavar=_type_name(tp).split()[0].upper(), help=f"{f.metadata['help']} [{section}; {default}]"
        )
    return parser


def load_config(config_path: str | None = None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Preset (or the defaults: the 124M recipe) + flat overrides {field: value-or-string}, validated."""
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (presets live in configs/)")
        cfg = config_from_dict(yaml.safe_load(path.read_text()) or {}, where=str(path))
    else:
        cfg = TrainConfig()
    index = _field_index()
    for key, value in (overrides or {}).items():
        if key not in index:
            raise _unknown(key, index, "command line")
        section, f, tp = index[key]
        setattr(getattr(cfg, section), key, _coerce(value, tp, f"--{key}"))
    return cfg.validate()


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line of train.py: `--config FILE --field value ...` -> validated TrainConfig."""
    parser = build_arg_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        key = flag.lstrip("-").split("=")[0]
        close = difflib.get_close_matches(key, list(_field_index()), n=1)
        hint = f" Did you mean --{close[0]}?" if close else ""
        parser.error(f"unknown option {flag!r}.{hint} See --help for the full list.")
    values = vars(args)
    return load_config(values.pop("config", None), values)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved config as a YAML preset (re-runnable with --config)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---- batch arithmetic ------------------------------------------------------------------------------------------


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


# ---- learning-rate schedule ------------------------------------------------------------------------------------


def lr_at(step: int, o: OptimConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to max_lr, cosine to min_lr at max_steps, then flat.

    A pure function of the step, so a resumed run needs nothing but the step count; it is set on the optimizer's
    param_groups once per optimizer step (a prepared scheduler would step once per process, see hf-stack.md 3.3).
    Warmup reaches max_lr at step warmup_steps - 1, as in build-nanogpt.
    """
    if step < o.warmup_steps:
        return o.max_lr * (step + 1) / o.warmup_steps
    if step >= o.max_steps:
        return o.min_lr
    progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)  # 0 -> 1
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.max_lr - o.min_lr)
