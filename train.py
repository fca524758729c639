"""Train GPT-2 (124M, or any size) on token shards with accelerate: one GPU, many, or a laptop CPU.

    accelerate launch train.py --config configs/tiny.yaml                 # minutes on a laptop CPU
    accelerate launch train.py --config configs/gpt2_124m.yaml            # the GPT-2 reproduction
    python train.py --config configs/tiny.yaml --max_steps 40 --resume latest

Every field of train_config.py is also an option (`--max_lr 1e-3`, `--micro_batch_size 16`, ...). The run folder
(`--output_dir`) gets metrics.jsonl (one line per optimizer step, plus evaluation lines), config.yaml and
run_info.json (what ran, where), TensorBoard logs, checkpoints/step_N (full training states), and export/ +
export-gpt2/ (the newest model, loadable with AutoModelForCausalLM).

accelerate owns devices, mixed precision, gradient accumulation, clipping, distribution and the training state;
the data loader shards by rank itself (it is never passed to `prepare`) and its position is saved per rank.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import psutil
import torch
import transformers
from accelerate import Accelerator, DistributedType
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

import checkpointing as ckpt
from atomic_io import link_tree, strict_json, write_json_atomic
from cli import ConfigError
from evaluate_gpt2 import HellaSwagUnavailable, load_hellaswag, score_hellaswag, validation_loss
from gpt2_tokenizer import build_hf_tokenizer, get_gpt2_encoding
from hub import DEFAULT_DATASET_CONFIGS, HubUploader, write_model_card
from modeling_gpt2_repro import GPT2ReproForCausalLM, estimate_flops_per_token
from run_info import collect_run_info, mfu, peak_bf16_flops
from text_stream import open_text_stream
from token_data import DataError, StreamingTokenLoader, TokenShardLoader, iter_val_batches
from train_config import (
    DataConfig,
    TrainConfig,
    grad_accum_steps,
    lr_at,
    parse_args,
    save_config,
)

# ---------------------------------------------------------------------------------------------------- setup


def precision_and_compile(cfg: TrainConfig, cuda: bool, env=os.environ) -> tuple[str, str]:
    """(mixed precision, dynamo backend): the config's values, or for "auto" bf16 + inductor on CUDA, none on CPU.

    "auto" takes the `accelerate launch` config's choice when it made one; `accelerate launch` exports
    ACCELERATE_MIXED_PRECISION=no and ACCELERATE_DYNAMO_BACKEND=NO when it was not told, so those mean "no choice".
    """
    precision, launched = (
        cfg.run.mixed_precision,
        env.get("ACCELERATE_MIXED_PRECISION", "no").lower(),
    )
    if precision == "auto":
        precision = launched if launched != "no" else "bf16" if cuda else "no"
    backend, launched = cfg.run.compile, env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if backend is None:
        backend = launched if launched != "no" else "inductor" if cuda else "no"
    else:
        backend = "inductor" if backend else "no"
    return precision, backend


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    """Accelerator with the settings above and the derived gradient accumulation; CPU threads; TF32 on CUDA."""
    cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    precision, backend = precision_and_compile(cfg, cuda)
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        precision = "fp16"  # V100, T4: fp16 with a gradient scaler
    trackers = [t.strip() for t in cfg.run.log_with.split(",") if t.strip() and t.strip() != "none"]
    accelerator = Accelerator(
        mixed_precision=precision,
        dynamo_backend=backend,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "logs")
        ),
    )
    data = cfg.data
    accelerator.gradient_accumulation_steps = grad_accum_steps(
        data.total_batch_tokens, data.micro_batch_size, data.seq_len, accelerator.num_processes
    )
    if accelerator.device.type == "cuda" and cfg.run.tf32:
        torch.set_float32_matmul_precision(
            "high"
        )  # TF32 matmuls: fp32 params, ~8x the fp32 throughput
    if (
        accelerator.device.type == "cpu"
    ):  # `accelerate launch` pins CPU jobs to 1 thread unless told otherwise
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(cfg.run.cpu_threads or max(1, cores // local_processes))
    return accelerator


def build_model(cfg: TrainConfig) -> GPT2ReproForCausalLM:
    return GPT2ReproForCausalLM(cfg.model_config())


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; weight decay on 2-D+ tensors (matmul weights, embeddings) only, not on biases and LayerNorms."""
    params = [
        p for p in model.parameters() if p.requires_grad
    ]  # the tied embedding/LM head appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optim = cfg.optim
    betas = (optim.beta1, optim.beta2)
    fused = fused_adamw(device) or None  # None: PyTorch's default (foreach) elsewhere
    return torch.optim.AdamW(groups, lr=lr_at(0, optim), betas=betas, eps=optim.eps, fused=fused)


def fused_adamw(device: torch.device) -> bool:
    """AdamW's fused kernel (one launch for all parameters) on CUDA, where it is fastest."""
    return device.type == "cuda"


def check_data_dir(cfg: TrainConfig) -> None:
    """Fail before anything starts when there is no prepared data or too little validation data for val_tokens.

    A stream (--dataset) is opened: its id, files and text column are checked; its length is known only once read.
    """
    if cfg.data.dataset is not None:
        data = cfg.data
        open_text_stream(data.dataset, data.dataset_name, data.dataset_split, data.text_column)
        return
    if not glob.glob(cfg.data.data_dir):
        raise ConfigError(
            f"no training shards in data_dir={cfg.data.data_dir!r}. Prepare them first, e.g. "
            f"`python data_prep.py --dataset my_text.txt --output_dir {cfg.data.data_dir}` (see the README), "
            f"or pass --data_dir."
        )
    next(
        iter_val_batches(cfg.data.data_dir, 1, cfg.data.seq_len, cfg.eval.val_tokens), None
    )  # DataError if short


def record_run(cfg: TrainConfig, accelerator: Accelerator, run_dir: Path, log) -> None:
    """Print and save the resolved config and the facts of this run (versions, commit, hardware, batch)."""
    data, accum = cfg.data, accelerator.gradient_accumulation_steps
    if accelerator.is_main_process:
        info = collect_run_info(
            {
                "num_processes": accelerator.num_processes,
                "grad_accum_steps": accum,
                "device": str(accelerator.device),
                "mixed_precision": accelerator.mixed_precision,
                "compile": str(accelerator.state.dynamo_plugin.backend.value),
                "optimizer_fused": fused_adamw(accelerator.device),
            }
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_json_atomic(run_dir / "run_info.json", info)
        log((run_dir / "config.yaml").read_text() + json.dumps(info, indent=2))
        log(
            f"batch: {data.total_batch_tokens:,} tokens/step = {data.micro_batch_size} x {data.seq_len} x "
            f"{accelerator.num_processes} processes x {accum} accumulation steps"
        )


def append_jsonl(path: Path, row: dict) -> None:
    """One strict-JSON line (a non-finite number becomes null). Reopened per line: a killed run loses at most
    the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(row)) + "\n")


def describe_data(data: DataConfig) -> str | None:
    """The dataset trained on ("HuggingFaceFW/fineweb-edu (sample-10BT)"): the stream's, else the one named in
    data_prep.py's manifest.json, if any."""
    if data.dataset is not None:
        name = data.dataset_name or DEFAULT_DATASET_CONFIGS.get(data.dataset)
        return data.dataset + (f" ({name})" if name else "")
    try:
        source = json.loads((Path(data.data_dir) / "manifest.json").read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    name = source.get("name") or source.get("config")
    return f"{source.get('dataset')}" + (f" ({name})" if name else "")


# ----------------------------------------------------------------------------------------------- one step


def train_step(
    accelerator: Accelerator, model, optimizer, loader, lr: float, grad_clip: float
) -> tuple[float, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches per process.

    Returns (loss averaged over every micro-batch of every process, global gradient norm before clipping).
    """
    for group in optimizer.param_groups:  # set per optimizer step, see lr_at
        group["lr"] = lr
    accum = accelerator.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=accelerator.device)
    for _ in range(accum):
        x, y = loader.next_batch()  # (B, T) int64 each: this rank's share of the global batch
        x, y = (
            x.to(accelerator.device, non_blocking=True),
            y.to(accelerator.device, non_blocking=True),
        )
        with accelerator.accumulate(model):  # no DDP all-reduce until the last micro-step
            loss = model(input_ids=x, shift_labels=y, return_logits=False).loss  # fp32 scalar
            accelerator.backward(loss)  # scaled by 1 / accum inside
            loss_sum += loss.detach()
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
            optimizer.step()  # both no-ops until the gradients are synced
            optimizer.zero_grad(set_to_none=True)
    mean_loss = accelerator.reduce(loss_sum / accum, reduction="mean")
    loss_value, norm_value = torch.stack(
        [mean_loss, grad_norm.detach().float()]
    ).tolist()  # one device sync
    return loss_value, norm_value


# --------------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Validation loss, HellaSwag and samples (evaluate_gpt2's functions), logged like the training steps.

    They run on the uncompiled module, which shares its parameters with the compiled, distributed one: no
    recompiling for every new shape (HellaSwag rows and generation steps vary in length), and no DDP collectives,
    which would hang when ranks run different numbers of batches.
    """

    def __init__(
        self, cfg: TrainConfig, accelerator: Accelerator, encoding, run_dir: Path, log, loader
    ):
        self.cfg, self.accelerator, self.encoding, self.run_dir, self.log = (
            cfg,
            accelerator,
            encoding,
            run_dir,
            log,
        )
        self.loader = loader
        self.hellaswag = None
        self.enabled = accelerator.distributed_type != DistributedType.FSDP
        if not self.enabled:
            log(
                "warning: no evaluation during FSDP training (it needs the whole model in every process); "
                "run evaluate_gpt2.py on the exports instead"
            )
        elif cfg.eval.hellaswag:
            with (
                accelerator.main_process_first()
            ):  # the first process downloads into the cache, then the rest
                try:
                    self.hellaswag = load_hellaswag(
                        cfg.eval.hellaswag_file, limit=cfg.eval.hellaswag_limit
                    )
                except (
                    HellaSwagUnavailable
                ) as e:  # offline and no local file: warn once and train on
                    log(f"warning: no HellaSwag during training: {e}")

    def due(self, step: int) -> bool:
        every = self.cfg.eval.eval_every
        return self.enabled and (
            step == self.cfg.optim.max_steps or bool(every and step % every == 0)
        )

    def __call__(self, model: GPT2ReproForCausalLM, step: int) -> dict:
        evals, data, accelerator = self.cfg.eval, self.cfg.data, self.accelerator
        batch_size = evals.eval_batch_size or data.micro_batch_size
        val_loss = validation_loss(
            model,
            validation_data(self.cfg, self.loader),
            evals.val_tokens,
            batch_size,
            data.seq_len,
            accelerator=accelerator,
        )
        results = {"val_loss": val_loss}
        if self.hellaswag is not None:
            scores = score_hellaswag(
                model,
                self.encoding,
                self.hellaswag,
                evals.eval_batch_size or 16,
                accelerator=accelerator,
            )
            results |= {"hellaswag_acc_norm": scores["acc_norm"], "hellaswag_acc": scores["acc"]}
        accelerator.log(results, step=step)
        if accelerator.is_main_process:
            append_jsonl(self.run_dir / "metrics.jsonl", {"step": step, **results})
            self.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
            for i, text in enumerate(self.sample(model, step) if evals.num_samples else []):
                self.log(f"--- sample {i} at step {step}:\n{text}")
        return results

    @torch.no_grad()
    def sample(self, model: GPT2ReproForCausalLM, step: int) -> list[str]:
        """Top-k samples with the KV cache (generate), on a forked RNG so training randomness is untouched."""
        evals, device = self.cfg.eval, self.accelerator.device
        prompt = [self.encoding.encode(evals.sample_prompt)] * evals.num_samples
        prompt = torch.tensor(prompt, device=device)  # (n, P)
        was_training = model.training
        model.eval()
        cuda_rng = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_rng):  # autocast: prepare() set it on the module
            torch.manual_seed(self.cfg.run.seed + step)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=evals.sample_tokens,
                do_sample=True,
                top_k=50,
            )  # (n, P + sample_tokens)
        model.train(was_training)
        return [self.encoding.decode(row.tolist()) for row in out]


# ------------------------------------------------------------------------------------------- checkpointing


def export_model(
    model, folder: Path, tokenizer, card: dict, stock_card: dict, state_dict=None
) -> None:
    """folder/export: our model + remote code + tokenizer + card; folder/export-gpt2: the stock GPT2LMHeadModel.

    The stock export is converted from the folder just written (not from the live module), which also proves
    that the export loads, whatever wraps the live module (DDP, FSDP).
    """
    ours, stock = folder / "export", folder / "export-gpt2"
    model.save_pretrained(ours, state_dict=state_dict)
    tokenizer.save_pretrained(ours)
    write_model_card(ours, **card)
    GPT2ReproForCausalLM.from_pretrained(
        ours, dtype=torch.float32
    ).to_official_gpt2().save_pretrained(stock)
    tokenizer.save_pretrained(stock)
    write_model_card(stock, **stock_card, stock_gpt2=True)


class Checkpointer:
    """Every checkpoint_every steps and at the end: training state + exports, committed atomically, then uploaded.

    Layout and guarantees: checkpointing.py. accelerate's save_state holds the model, optimizer, RNG states and
    its micro-step counter; next to it go each rank's data position and our trainer_state.json.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Accelerator,
        model,
        raw_model,
        loader,
        run_dir: Path,
        encoding,
    ):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        self.model, self.raw_model, self.loader = model, raw_model, loader
        is_main, settings = accelerator.is_main_process, cfg.checkpoint
        self.tokenizer = None
        if is_main:
            self.tokenizer = build_hf_tokenizer(encoding, model_max_length=cfg.model.n_positions)
        self.uploader = None
        if settings.push_to_hub and is_main:
            staging = run_dir / ".hub-staging"
            self.uploader = HubUploader(settings.push_to_hub, staging, settings.hub_private)
        self.card = {"config": cfg.to_dict(), "data_source": describe_data(cfg.data)}

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint.checkpoint_every
        return step == self.cfg.optim.max_steps or bool(every and step % every == 0)

    def save(self, trainer_state: dict) -> Path | None:
        acc, run_dir, step = self.accelerator, self.run_dir, trainer_state["step"]
        tmp = ckpt.temp_checkpoint_dir(run_dir / "checkpoints", step)
        if acc.is_main_process:
            shutil.rmtree(
                tmp, ignore_errors=True
            )  # a leftover of a run killed while saving this same step
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        write_json_atomic(tmp / f"loader_rank{acc.process_index}.json", self.loader.state_dict())
        full_state = None  # under FSDP, gather the whole model (a collective: every rank calls it)
        if (
            acc.distributed_type == DistributedType.FSDP
        ):  # FSDP2 shards raw_model in place; it has no _orig_mod.
            full_state = acc.get_state_dict(self.raw_model if acc.is_fsdp2 else self.model)
        if acc.is_main_process:
            write_json_atomic(tmp / ckpt.TRAINER_STATE, trainer_state)
            card = {**self.card, "step": step, "tokens": trainer_state["tokens_seen"]}
            card |= {
                k: trainer_state.get(k) for k in ("val_loss", "val_step", "hellaswag_acc_norm")
            }
            ours = {
                **card,
                "where": self.cfg.checkpoint.push_to_hub or str(run_dir.resolve() / "export"),
            }
            stock = {
                **card,
                "where": str(run_dir.resolve() / "export-gpt2"),
            }  # the stock export stays local
            export_model(self.raw_model, tmp, self.tokenizer, ours, stock, state_dict=full_state)
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            final = ckpt.commit_checkpoint(tmp, self.cfg.checkpoint.keep_last)
            for name in ("export", "export-gpt2"):
                link_tree(final / name, run_dir / name)
            if self.uploader:
                self.uploader.submit(run_dir / "export", f"step {step}")
        acc.wait_for_everyone()
        return final

    def close(self, log) -> None:
        if self.uploader:
            log(f"waiting for the last Hub upload to {self.uploader.repo_id}...")
            self.uploader.close()


def resume(accelerator: Accelerator, loader, cfg: TrainConfig, run_dir: Path) -> dict:
    """Restore the newest (or the given) checkpoint. Returns its trainer state ({} for a fresh start)."""
    found = ckpt.resolve_resume(cfg.checkpoint.resume, run_dir / "checkpoints")
    if found is None:
        if cfg.checkpoint.resume is None and ckpt.list_checkpoints(run_dir / "checkpoints"):
            raise ConfigError(
                f"{run_dir} already holds checkpoints of an earlier run. Continue it with --resume latest, "
                f"or train from scratch in another --output_dir."
            )
        return {}
    state = ckpt.read_trainer_state(found)
    if state["num_processes"] != accelerator.num_processes:
        raise ConfigError(
            f"{found} was written by {state['num_processes']} processes, this run has {accelerator.num_processes}. "
            f"RNG states and data positions are saved per process: resume with the same number."
        )
    accelerator.load_state(str(found))
    accelerator.step = (
        0  # accelerate's micro-step counter: saves happen on optimizer-step boundaries
    )
    loader.load_state_dict(
        json.loads((found / f"loader_rank{accelerator.process_index}.json").read_text())
    )
    return state


# ------------------------------------------------------------------------------------------------- the run


def make_loader(
    cfg: TrainConfig, accelerator: Accelerator
) -> TokenShardLoader | StreamingTokenLoader:
    """This process's training batches: the loader shards by rank itself (never passed to `prepare`)."""
    data = cfg.data
    if data.dataset is not None:
        return StreamingTokenLoader(
            data.dataset,
            data.dataset_name,
            data.dataset_split,
            data.text_column,
            batch_size=data.micro_batch_size,
            seq_len=data.seq_len,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=cfg.run.seed,
            shuffle=data.shuffle,
            val_tokens=data.stream_val_tokens,
            shard_tokens=data.stream_shard_tokens,
            shuffle_windows=data.stream_shuffle_windows,
            keep_val_tokens=cfg.eval.val_tokens // data.seq_len * data.seq_len + 1,
            num_workers=data.stream_workers,
            batch_docs=data.stream_batch_docs,
            retries=data.stream_retries,
        )
    return TokenShardLoader(
        data.data_dir,
        split="train",
        batch_size=data.micro_batch_size,
        seq_len=data.seq_len,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.run.seed,
        shuffle=data.shuffle,
    )


def validation_data(cfg: TrainConfig, loader):
    """What evaluate_gpt2.validation_loss reads: the shards' folder, or a stream's first tokens (the same tokens
    as the val shard data_prep.py would write from it)."""
    return loader.validation_tokens if cfg.data.dataset is not None else cfg.data.data_dir


def tracker_config(cfg: TrainConfig) -> dict:
    """The config flattened to `section.field` scalars (TensorBoard's hparams accept no lists or None)."""
    flat = {}
    for section, fields in cfg.to_dict().items():
        for name, value in fields.items():
            flat[f"{section}.{name}"] = (
                value if isinstance(value, (int, float, str, bool)) else str(value)
            )
    return flat


def peak_flops(cfg: TrainConfig, accelerator: Accelerator) -> float | None:
    """Dense bf16 peak FLOP/s of one device for MFU: --peak_tflops, else the GPU table (None on CPU)."""
    if cfg.run.peak_tflops:
        return cfg.run.peak_tflops * 1e12
    on_cuda = accelerator.device.type == "cuda"
    return peak_bf16_flops(torch.cuda.get_device_name()) if on_cuda else None


# ------------------------------------------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> Path:
    t_start = time.time()
    cfg = parse_args(argv)
    data, optim = cfg.data, cfg.optim
    check_data_dir(cfg)
    try:
        encoding = get_gpt2_encoding()
    except RuntimeError as e:  # offline without a cached vocabulary: the message gives the fix
        raise ConfigError(str(e)) from None
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars at every checkpoint
    run_dir = Path(cfg.run.output_dir)
    accelerator = make_accelerator(cfg, run_dir)
    is_main = accelerator.is_main_process
    log = tqdm.write if is_main else (lambda *_: None)
    record_run(cfg, accelerator, run_dir, log)

    set_seed(cfg.run.seed)  # the same initial weights on every rank
    raw_model = build_model(
        cfg
    )  # the plain module: evaluation, sampling, export (shares parameters with `model`)
    optimizer = build_optimizer(raw_model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    loader = make_loader(cfg, accelerator)
    state = resume(accelerator, loader, cfg, run_dir)
    step, tokens_seen = state.get("step", 0), state.get("tokens_seen", 0)
    last_eval = {k: state.get(k) for k in ("val_loss", "val_step", "hellaswag_acc_norm")}
    if is_main:
        ckpt.truncate_metrics(
            run_dir / "metrics.jsonl", step
        )  # steps after the checkpoint are redone
        log(
            f"resumed from step {step} ({run_dir})"
            if step
            else f"training from scratch in {run_dir}"
        )

    evaluator = Evaluator(cfg, accelerator, encoding, run_dir, log, loader)
    checkpointer = Checkpointer(cfg, accelerator, model, raw_model, loader, run_dir, encoding)
    wandb_run = {"wandb": {"name": run_dir.name}}
    accelerator.init_trackers(
        cfg.run.project_name, config=tracker_config(cfg), init_kwargs=wandb_run
    )
    flops_per_token = estimate_flops_per_token(raw_model.config, data.seq_len)
    peak = peak_flops(cfg, accelerator)
    bar = tqdm(
        total=optim.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True
    )

    model.train()
    while step < optim.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, optim)
        loss, grad_norm = train_step(accelerator, model, optimizer, loader, lr, optim.grad_clip)
        dt = time.perf_counter() - t0
        step, tokens_seen = step + 1, tokens_seen + data.total_batch_tokens
        tokens_per_sec = data.total_batch_tokens / dt
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        row |= {"tokens_per_sec": tokens_per_sec, "step_time_ms": dt * 1000, "tokens": tokens_seen}
        step_mfu = mfu(flops_per_token, tokens_per_sec, peak, accelerator.num_processes)
        row |= {} if math.isnan(step_mfu) else {"mfu": step_mfu}
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if is_main:
            append_jsonl(run_dir / "metrics.jsonl", row)
            bar.set_postfix_str(progress_line(row), refresh=False)
            bar.update(1)

        if evaluator.due(step):
            last_eval = {**evaluator(raw_model, step), "val_step": step}
        if checkpointer.due(step):
            trainer_state = {"step": step, "tokens_seen": tokens_seen}
            trainer_state |= {
                "num_processes": accelerator.num_processes,
                "micro_batch_size": data.micro_batch_size,
            }
            trainer_state |= {"seq_len": data.seq_len, **last_eval}
            log(f"checkpoint {checkpointer.save(trainer_state)}")

    bar.close()
    loader.close()  # a stream's reader threads
    accelerator.end_training()
    checkpointer.close(log)
    log(f"done: {step} steps in {time.time() - t_start:.0f}s; model in {run_dir / 'export'}")
    return run_dir


def progress_line(row: dict) -> str:
    """The progress bar's postfix for one metrics row."""
    line = f"loss {row['loss']:.4f} lr {row['lr']:.2e} gnorm {row['grad_norm']:.2f} {row['step_time_ms']:.0f}ms "
    line += f"{row['tokens_per_sec'] / 1e3:.1f}k tok/s"
    return line + (f" mfu {row['mfu']:.1%}" if "mfu" in row else "")


if __name__ == "__main__":
    try:
        main()
    except (
        ConfigError,
        DataError,
        FileNotFoundError,
    ) as e:  # bad settings or data: the message says what to do
        tqdm.write(f"error: {e}", file=sys.stderr)  # on its own line, also under a progress bar
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: continue with --resume latest", file=sys.stderr)
        sys.exit(130)
