"""Train GPT-2 (124M, or any size) on token shards with accelerate: one GPU, many, or a laptop CPU.

    accelerate launch train.py --config configs/tiny.yaml                 # minutes on a laptop CPU
    accelerate launch train.py --config configs/gpt2_124m.yaml            # the GPT-2 reproduction
    python train.py --config configs/tiny.yaml --max_steps 40 --resume latest

Every field of train_config.py is also an option (`--max_lr 1e-3`, `--micro_batch_size 16`, ...). The run folder
(`--output_dir`) gets metrics.jsonl (one line per optimizer step, plus evaluation lines), config.yaml and
run_info.json (what ran, where), TensorBoard logs, checkpoints/step_N (full training states, each also a model
folder that AutoModelForCausalLM loads), and export/ + export-gpt2/ (the newest model).

accelerate owns devices, mixed precision, gradient accumulation, clipping, distribution and the training state;
the data loader shards by rank itself (it is never passed to `prepare`) and its position is saved per rank.

A long run survives (stopping.py, run_folder.py): a non-finite loss or gradient norm never reaches the weights and
a streak of them stops the run; SIGTERM/SIGUSR1 (or the launcher's exit) save a checkpoint at the current step and
exit with code 75; one run per folder (a lock); a resume is checked against the checkpoint's settings before
anything is written, and may use another number of processes when the tokens per step stay the same.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import resource
import secrets
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import torch
import transformers
from accelerate import Accelerator, DistributedType
from accelerate.utils import (
    ProjectConfiguration,
    broadcast_object_list,
    parse_flag_from_env,
    set_seed,
)
from tqdm.auto import tqdm

import checkpointing as ckpt
import cli
from atomic_io import link_or_copy, link_tree, strict_json, write_atomic, write_json_atomic
from cli import ConfigError, RunError, Stop, describe_environment_error
from evaluate_gpt2 import (
    EvaluationInputError,
    HellaSwagUnavailable,
    load_hellaswag,
    score_hellaswag,
    validation_loss,
)
from gpt2_tokenizer import build_hf_tokenizer, get_gpt2_encoding
from hub import (
    STOCK_GPT2_BRANCH,
    HubAccessError,
    HubUploader,
    manifest_source,
    write_model_card,
)
from modeling_gpt2_repro import GPT2ReproForCausalLM, estimate_flops_per_token
from run_folder import RunLock, read_previous, record_attempt
from run_info import collect_run_info, mfu, peak_bf16_flops
from stopping import PREEMPTED_EXIT_CODE, DivergenceGuard, StopRequest, nonfinite_parameters
from text_stream import open_text_stream
from token_data import (
    DataError,
    StreamingTokenLoader,
    TokenShardLoader,
    check_shards,
    data_fingerprint,
    iter_val_batches,
)
from train_config import TrainConfig, grad_accum_steps, lr_at, parse_args, save_config

# ---------------------------------------------------------------------------------------------------- setup

WANDB_ID_FILE = "wandb_run_id"  # in the run folder: a resumed run logs to the same W&B run


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


# The matrices torch.optim.Muon trains with optimizer=muon: the blocks' attention and MLP weights.
MUON_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def muon_param_names(model: torch.nn.Module) -> set[str]:
    """Names of the 2-D weight matrices inside the transformer blocks (transformer.h.<i>.<MUON_MATRICES>)."""
    in_block = re.compile(r"(?:.+\.)?h\.\d+\.(.+)")
    return {
        name
        for name, p in model.named_parameters()
        if p.requires_grad
        and p.dim() == 2
        and (m := in_block.fullmatch(name))
        and m[1] in MUON_MATRICES
    }


def build_optimizers(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> list[torch.optim.Optimizer]:
    """[AdamW], or with optimizer=muon [AdamW, Muon]: every trainable parameter in exactly one group.

    AdamW: weight decay on 2-D+ tensors (matmul weights, embeddings) only, not on biases and LayerNorms.
    Muon (PyTorch's torch.optim.Muon): the blocks' attention and MLP matrices. AdamW keeps the rest, the
    token embedding included, which is also the tied LM head (named_parameters lists a shared tensor once).
    """
    optim = cfg.optim
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_names = muon_param_names(model) if optim.optimizer == "muon" else set()
    rest = [p for n, p in named if n not in muon_names]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas = (optim.beta1, optim.beta2)
    fused = fused_adamw(device) or None  # None: PyTorch's default (foreach) elsewhere
    (adamw_peak, _), *muon_peak = schedule_peaks(optim)
    adamw = torch.optim.AdamW(groups, lr=adamw_peak, betas=betas, eps=optim.eps, fused=fused)
    if optim.optimizer != "muon":
        return [adamw]
    if device.type == "cpu":
        orthogonalize_in_fp32_on_cpu()
    muon = torch.optim.Muon(
        [p for n, p in named if n in muon_names],
        lr=muon_peak[0][0],
        weight_decay=optim.muon_weight_decay,
        momentum=optim.muon_momentum,
        nesterov=optim.muon_nesterov,
        ns_steps=optim.muon_ns_steps,
        adjust_lr_fn=optim.muon_adjust_lr_fn,
    )
    return [adamw, muon]


def schedule_peaks(optim) -> list[tuple[float, float]]:
    """(peak, floor) of each optimizer of build_optimizers: AdamW's, then Muon's (the same final fraction).

    Read from the config at every step, not from the param groups (a resume restores those from the
    checkpoint), so a resume with other LRs takes them.
    """
    adamw = (optim.max_lr, optim.min_lr)
    muon = (optim.muon_lr, optim.muon_lr * optim.min_lr / optim.max_lr)
    return [adamw, muon] if optim.optimizer == "muon" else [adamw]


def set_lrs(optimizers: list, step: int, optim) -> dict[str, float]:
    """Every param group's LR for optimizer step `step`; returns {"lr": AdamW's, "muon_lr": Muon's}."""
    lrs = {}
    for name, optimizer, (peak, floor) in zip(
        ("lr", "muon_lr"), optimizers, schedule_peaks(optim), strict=False
    ):
        lrs[name] = lr_at(step, optim, peak, floor)
        for group in optimizer.param_groups:
            group["lr"] = lrs[name]
    return lrs


_TORCH_NEWTON_SCHULZ = torch.optim._muon._zeropower_via_newtonschulz


def _newton_schulz(grad, ns_coefficients, ns_steps: int, eps: float):
    """torch.optim.Muon's orthogonalization, the same quintic Newton-Schulz iteration, in fp32 on the CPU.

    PyTorch runs it in bfloat16, which GPUs are fast at. A CPU without native bf16 matrix units is 20-40x
    slower in bf16 than in fp32 (measured on a 2-core x86 VM: (768, 256) @ (256, 768) 503 ms vs 14 ms), which
    made a Muon step of a 6x256 GPT-2 cost over a minute. Elsewhere, PyTorch's own function runs unchanged.
    """
    if grad.device.type != "cpu":
        return _TORCH_NEWTON_SCHULZ(grad, ns_coefficients, ns_steps, eps)
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x  # (rows <= cols): the Gram matrix is the small side
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(grad.dtype)


def orthogonalize_in_fp32_on_cpu() -> None:
    """Make torch.optim.Muon orthogonalize CPU gradients in fp32 (see _newton_schulz); idempotent."""
    torch.optim._muon._zeropower_via_newtonschulz = _newton_schulz


def check_optimizer_support(cfg: TrainConfig, distributed_type: DistributedType) -> None:
    """Refuse what Muon cannot do: orthogonalizing a weight needs the whole matrix in every process."""
    if cfg.optim.optimizer == "muon" and distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "optimizer=muon cannot run under FSDP: Muon orthogonalizes each whole weight matrix, and FSDP "
            "shards them across processes. Use DDP (distributed_type: MULTI_GPU in the accelerate config) "
            "or --optimizer adamw."
        )


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


def record_run(cfg: TrainConfig, accelerator: Accelerator, run_dir: Path, log, **attempt) -> None:
    """Print and save the resolved config and the facts of this run (versions, commit, hardware, batch).

    Called once every check has passed, so a refused run leaves the folder as it was. run_info.json keeps a history:
    `attempt` (start step, checkpoint resumed from) and what changed since the previous attempt are appended.
    """
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
        previous_config, previous_info = read_previous(run_dir)
        info = record_attempt(info, previous_info, previous_config, cfg.to_dict(), **attempt)
        save_config(cfg, run_dir / "config.yaml")
        write_json_atomic(run_dir / "run_info.json", info)
        shown = {k: v for k, v in info.items() if k != "attempts"}
        log((run_dir / "config.yaml").read_text() + json.dumps(shown, indent=2))
        if info["attempts"][-1]["changed"]:
            log(f"changed since the previous attempt: {info['attempts'][-1]['changed']}")
        log(
            f"batch: {data.total_batch_tokens:,} tokens/step = {data.micro_batch_size} x {data.seq_len} x "
            f"{accelerator.num_processes} processes x {accum} accumulation steps"
        )


def append_jsonl(path: Path, row: dict) -> None:
    """One strict-JSON line (a non-finite number becomes null). Reopened per line: a killed run loses at most
    the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(row)) + "\n")


# ----------------------------------------------------------------------------------------------- one step


class StepResult(NamedTuple):
    """What one optimizer step reports; every field is the same on every process."""

    loss: float  # mean over every micro-batch of every process; NaN or inf when the step diverged
    grad_norm: float  # global gradient norm before clipping
    skipped: bool  # no update: a non-finite loss or norm, or a gradient-scaler overflow
    bad: bool  # skipped for a non-finite loss or norm: what the divergence guard counts
    stop: bool  # some process was asked to stop (StopRequest)


def train_step(
    accelerator: Accelerator,
    model,
    optimizers: list,
    loader,
    grad_clip: float,
    stop: StopRequest | None = None,
) -> StepResult:
    """One optimizer step over `gradient_accumulation_steps` micro-batches per process.

    `optimizers` (AdamW, or AdamW + Muon) have their LRs set before (set_lrs). The update is applied only when the
    loss and the gradient norm are finite. Both are known after the step's one device sync (placed before the
    optimizers' step, so the guard costs no extra sync), and both are the same on every process (the loss is
    reduced, the norm is that of the all-reduced gradients): every process decides alike. Whether `stop` was
    requested (by now, on any process) rides along in the loss reduction, so all processes agree to stop after the
    same step.
    """
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
    # The last micro-step synced the gradients (accelerator.sync_gradients stays True until the next accumulate).
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    flag = torch.full((), float(stop is not None and stop.requested), device=accelerator.device)
    mean_loss, stop_flag = accelerator.reduce(torch.stack([loss_sum / accum, flag]), "mean")
    grad_norm = getattr(grad_norm, "full_tensor", lambda: grad_norm)()  # FSDP2: a DTensor
    loss_value, norm_value, stop_value = torch.stack(
        [mean_loss, grad_norm.detach().float(), stop_flag]
    ).tolist()  # the step's one device sync
    finite = math.isfinite(loss_value) and math.isfinite(norm_value)
    # fp16: a GradScaler skips overflowing steps itself and lowers its scale
    scaler = accelerator.scaler is not None
    skipped = not finite
    for optimizer in optimizers:
        if finite or scaler:
            optimizer.step()
        skipped = skipped or (scaler and optimizer.step_was_skipped)
        optimizer.zero_grad(set_to_none=True)  # the gradients of a skipped step go too
    bad = not math.isfinite(loss_value) or (not finite and not scaler)
    return StepResult(loss_value, norm_value, skipped, bad, stop_value > 0)


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
        self.cfg, self.accelerator, self.encoding = cfg, accelerator, encoding
        self.run_dir, self.log, self.loader = run_dir, log, loader
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
        broken = not math.isfinite(val_loss)  # the same on every process (reduced)
        if broken:
            self.log(
                f"step {step}: validation loss {val_loss}: the model's outputs are not finite, so HellaSwag and "
                "samples are skipped"
            )
        if self.hellaswag is not None and not broken:
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
            for i, text in enumerate(
                self.sample(model, step) if evals.num_samples and not broken else []
            ):
                self.log(f"--- sample {i} at step {step}:\n{text}")
        if self.hellaswag is not None:  # for the model card: a subset's score is labelled as one
            results["hellaswag_examples"] = len(self.hellaswag)
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
                remove_invalid_values=True,  # NaN/inf logits of a bad model: sample anyway, no crash
            )  # (n, P + sample_tokens)
        model.train(was_training)
        n_vocab = self.encoding.n_vocab  # a bad model may even sample the padding ids
        return [self.encoding.decode([t for t in row.tolist() if t < n_vocab]) for row in out]


# ------------------------------------------------------------------------------------------- checkpointing


def save_model_files(model, folder: Path, tokenizer, card: dict, state_dict=None) -> list[str]:
    """The model as transformers saves it, at the root of `folder`, and the stock GPT2LMHeadModel in
    folder/export-gpt2. Returns the names written at the root (what the run's export/ links to).

    Root: config.json, model.safetensors, generation_config.json, modeling_gpt2_repro.py, tokenizer, model card:
    `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it. The stock export is
    converted from the folder just written (not from the live module), which also proves that it loads,
    whatever wraps the live module (DDP, FSDP).
    """
    if type(model) is not GPT2ReproForCausalLM:
        # FSDP2 swaps the module's class for a subclass of its own, whose source file (torch's FSDP code)
        # transformers would copy as the remote code. Save the gathered weights through a plain model.
        plain = GPT2ReproForCausalLM(model.config)
        missing, unexpected = plain.load_state_dict(state_dict or model.state_dict(), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head may be left out
            raise RuntimeError(f"saving the model: missing {missing}, unexpected {unexpected}")
        model, state_dict = plain, None
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer_files = [Path(f).name for f in tokenizer.save_pretrained(folder)]
    write_model_card(folder, **card)
    written = sorted(p.name for p in folder.iterdir() if p.is_file())
    stock = folder / ckpt.STOCK_EXPORT
    GPT2ReproForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ).to_official_gpt2().save_pretrained(stock)
    for name in tokenizer_files:  # the same tokenizer: linked, not written twice
        link_or_copy(folder / name, stock / name)
    write_model_card(stock, **card, stock_gpt2=True)
    return written


def register_weight_hooks(accelerator: Accelerator, raw_model) -> None:
    """accelerate's save_state/load_state with the model's weights as `save_pretrained` stores them.

    accelerate would write its own model.safetensors, named after whatever wraps the module (DDP's `module.`,
    torch.compile's `_orig_mod.`), which from_pretrained cannot read and which would be a second copy of the
    weights. Its save hook lets us drop that copy (save_model_files writes the model), its load hook read ours
    back. Under FSDP accelerate saves and loads its sharded state itself: its lists are empty here.
    """

    def drop_weights(models, weights, output_dir):
        weights.clear()

    def load_weights(models, input_dir):
        if models:
            ckpt.load_model_weights(raw_model, input_dir)
            models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(load_weights)


def open_hub(cfg: TrainConfig, accelerator: Accelerator, run_dir: Path) -> HubUploader | None:
    """--push_to_hub: check the login, create the repository and its gpt2 branch now, before any work.

    The main process asks the Hub; every process raises the same ConfigError when it says no, so a missing token
    stops the run in its first second rather than at the first checkpoint.
    """
    settings = cfg.checkpoint
    if not settings.push_to_hub:
        return None
    uploader, error = None, None
    if accelerator.is_main_process:
        staging = run_dir / ".hub-staging"
        uploader = HubUploader(settings.push_to_hub, staging, settings.hub_private)
        try:
            uploader.check_access()
        except HubAccessError as e:
            uploader.close()
            error = str(e)
    error = broadcast_object_list([error])[0]
    if error:
        raise ConfigError(error)
    return uploader


class Checkpointer:
    """Every checkpoint_every steps and at the end: model files + training state, committed atomically, uploaded.

    Layout and guarantees: checkpointing.py. The checkpoint folder is itself a model folder (save_model_files);
    accelerate's save_state adds the optimizer, RNG states and its micro-step counter (not the weights: see
    register_weight_hooks); next to them go each rank's data position and our trainer_state.json.
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
        uploader: HubUploader | None = None,
    ):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        self.model, self.raw_model, self.loader = model, raw_model, loader
        self.tokenizer = None
        if accelerator.is_main_process:
            self.tokenizer = build_hf_tokenizer(encoding, model_max_length=cfg.model.n_positions)
        self.uploader = uploader
        source = loader.source.identity if cfg.data.dataset is not None else None
        self.card = {
            "config": cfg.to_dict(),
            "data_source": source or manifest_source(cfg.data.data_dir),
        }
        self.card["repo_id"] = cfg.checkpoint.push_to_hub

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint.checkpoint_every
        return step == self.cfg.optim.max_steps or bool(every and step % every == 0)

    def save(self, trainer_state: dict) -> Path | None:
        acc, run_dir, step = self.accelerator, self.run_dir, trainer_state["step"]
        tmp = ckpt.temp_checkpoint_dir(run_dir / "checkpoints", step)
        full_state = None  # under FSDP, gather the whole model (a collective: every rank calls it)
        if (
            acc.distributed_type == DistributedType.FSDP
        ):  # FSDP2 shards raw_model in place; it has no _orig_mod.
            full_state = acc.get_state_dict(self.raw_model if acc.is_fsdp2 else self.model)
        model_files = []
        if acc.is_main_process:
            # a leftover of a run killed while saving this same step
            shutil.rmtree(tmp, ignore_errors=True)
            card = {**self.card, "step": step, "tokens": trainer_state["tokens_seen"]}
            card |= {
                k: trainer_state.get(k)
                for k in ("val_loss", "val_step", "hellaswag_acc_norm", "hellaswag_examples")
            }
            model_files = save_model_files(
                self.raw_model, tmp, self.tokenizer, card, state_dict=full_state
            )
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # optimizer, RNG states, scaler (the weights: save_model_files)
        write_json_atomic(tmp / f"loader_rank{acc.process_index}.json", self.loader.state_dict())
        if acc.is_main_process:
            write_json_atomic(tmp / ckpt.TRAINER_STATE, trainer_state)
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            final = ckpt.commit_checkpoint(tmp, self.cfg.checkpoint.keep_last)
            link_tree(final, run_dir / "export", names=model_files)
            link_tree(final / ckpt.STOCK_EXPORT, run_dir / ckpt.STOCK_EXPORT)
            if self.uploader:
                self.uploader.submit(run_dir / "export", f"step {step}")
                self.uploader.submit(
                    run_dir / ckpt.STOCK_EXPORT, f"step {step}", revision=STOCK_GPT2_BRANCH
                )
        acc.wait_for_everyone()
        return final

    def close(self, log) -> None:
        if self.uploader:
            log(f"waiting for the last Hub upload to {self.uploader.repo_id}...")
            self.uploader.close()


def find_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), refused before anything is written when it does not
    fit: an earlier run's checkpoints without --resume, or settings that differ from the checkpoint's."""
    found = ckpt.resolve_resume(cfg.checkpoint.resume, run_dir / "checkpoints")
    if found is None:
        if cfg.checkpoint.resume is None and ckpt.list_checkpoints(run_dir / "checkpoints"):
            raise ConfigError(
                f"{run_dir} already holds checkpoints of an earlier run. Continue it with --resume latest, "
                f"or train from scratch in another --output_dir."
            )
        return None
    state = ckpt.read_trainer_state(found)
    saved_data = json.loads((found / "loader_rank0.json").read_text()).get("shards")
    now_data = data_fingerprint(cfg.data.data_dir) if cfg.data.dataset is None else None
    problems = ckpt.resume_mismatches(state, cfg.to_dict(), saved_data, now_data)
    if problems:
        config = found.parent.parent / "config.yaml"
        raise ConfigError(
            f"{found} cannot be resumed with these settings: "
            + "; ".join(problems)
            + ". Nothing was changed. "
            f"Resume with the checkpoint's values (`--config {config} --resume latest` has them), or train from "
            "scratch in another --output_dir."
        )
    return found


def resume(accelerator: Accelerator, loader, cfg: TrainConfig, found: Path | None) -> dict:
    """Restore checkpoint `found` (None: a fresh start). Returns its trainer state ({} for a fresh start).

    Another number of processes than the checkpoint's is fine (find_checkpoint made sure the tokens per step are
    the same): the data position is global, so every process continues from it, and the weights, optimizer state
    and step are the checkpoint's. Only the per-process RNG streams (dropout, if any) cannot carry over; they are
    re-seeded from (seed, step, rank).
    """
    if found is None:
        return {}
    state = ckpt.read_trainer_state(found)
    saved_processes = state.get("num_processes", accelerator.num_processes)
    if saved_processes != accelerator.num_processes and cfg.data.dataset is not None:
        raise ConfigError(
            f"{found} was saved by {saved_processes} processes reading the stream --dataset, each at its own "
            f"position in it, so it resumes with {saved_processes} processes, not "
            f"{accelerator.num_processes} (`accelerate launch --num_processes {saved_processes} ...`). "
            "Runs on prepared shards (--data_dir) can change the process count."
        )
    # A rank without random_states_<rank>.pkl (more processes than the checkpoint's) keeps its RNGs: see below.
    accelerator.load_state(str(found))
    accelerator.step = (
        0  # accelerate's micro-step counter: saves happen on optimizer-step boundaries
    )
    loader_state = found / f"loader_rank{accelerator.process_index}.json"
    if saved_processes != accelerator.num_processes:
        seed = np.random.SeedSequence([cfg.run.seed, state["step"], accelerator.process_index])
        set_seed(int(seed.generate_state(1)[0]))
        loader_state = found / "loader_rank0.json"  # every rank saved the same global position
    loader.load_state_dict(json.loads(loader_state.read_text()))
    return state


def trainer_state(
    cfg: TrainConfig, accelerator: Accelerator, step: int, tokens_seen: int, last_eval: dict
) -> dict:
    """trainer_state.json of a checkpoint: where training stands, and the settings it is bound to."""
    data = cfg.data
    state = {"step": step, "tokens_seen": tokens_seen, "num_processes": accelerator.num_processes}
    state |= {"micro_batch_size": data.micro_batch_size, "seq_len": data.seq_len, **last_eval}
    return state | {"config": cfg.to_dict()}


def save_checkpoint(
    checkpointer: Checkpointer, accelerator: Accelerator, raw_model, state: dict, run_dir: Path, cfg
) -> Path | None:
    """`checkpointer.save`, guarded: never for non-finite weights (RunError naming the last good checkpoint),
    not without the disk space for it, and a failed or interrupted save removes its temporary folder (the previous
    checkpoints are untouched: they are replaced only by a complete new one)."""
    step, device = state["step"], accelerator.device
    bad = nonfinite_parameters(raw_model)
    count = accelerator.reduce(torch.tensor(float(len(bad)), device=device), reduction="sum")
    if count.item():  # FSDP: each process checked its own shards
        names = f" (e.g. {', '.join(bad[:3])})" if bad else ""
        raise diverged(f"the weights at step {step} hold NaN or inf{names}", run_dir, cfg)
    need = checkpoint_bytes(raw_model)
    on_main_process(accelerator, lambda: check_room(run_dir, need, f"checkpoint step {step}"))
    try:
        return checkpointer.save(state)
    except BaseException as e:
        if accelerator.is_main_process:
            shutil.rmtree(
                ckpt.temp_checkpoint_dir(run_dir / "checkpoints", step), ignore_errors=True
            )
        # torch.save reports a short write as "unexpected pos", without an errno: look at the disk itself.
        problem = None
        if isinstance(e, Exception) and describe_environment_error(e) is None:
            problem = room_problem(run_dir, need, f"checkpoint step {step}")
        if problem:
            raise RunError(
                f"checkpoint step {step} could not be written ({type(e).__name__}: {e}): {problem} Then "
                f"{ckpt.resume_hint(run_dir / 'checkpoints')}"
            ) from e
        raise


def diverged(what: str, run_dir: Path, cfg: TrainConfig) -> RunError:
    """The error that ends a diverged run: what happened, what can be resumed, what to try."""
    optim = cfg.optim
    lower = f"--max_lr {optim.max_lr / 2:g}"
    lower += f" --muon_lr {optim.muon_lr / 2:g}" if optim.optimizer == "muon" else ""
    saved = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not saved:
        return RunError(
            f"training diverged: {what}. No checkpoint was written, so there is nothing to resume: start over "
            f"with a lower learning rate (e.g. {lower}) or other optimizer settings."
        )
    (step, newest), older = saved[-1], [p for _, p in saved[:-1]]
    fallback = f" If it diverges again, resume from {older[-1]} instead." if older else ""
    return RunError(
        f"training diverged: {what}. Nothing was saved after that: the newest checkpoint, {newest} (step {step}), "
        f"holds finite weights. Resume it with a lower learning rate: --resume latest {lower}.{fallback} If it "
        "always happens at the same step, check the data there."
    )


# ------------------------------------------------------------------------------------------- the run folder


def on_main_process(accelerator: Accelerator, check) -> None:
    """Run `check()` on the main process; when it raises an expected error every process raises it, so none is
    left waiting for the others in a collective."""
    error = None
    if accelerator.is_main_process:
        try:
            check()
        except (ConfigError, RunError, DataError) as e:
            error = (type(e).__name__, str(e))
        except OSError as e:
            described = describe_environment_error(e)
            if described is None:
                raise
            error = ("RunError", described)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        kind = {"ConfigError": ConfigError, "RunError": RunError, "DataError": DataError}[error[0]]
        raise kind(error[1])


def claim_run_dir(run_dir: Path, accelerator: Accelerator, log) -> RunLock | None:
    """The main process locks the run folder for the whole run (run_folder.RunLock); a folder in use, read-only or
    not a folder stops every process at once."""
    lock = RunLock(run_dir)

    def acquire():
        try:
            lock.acquire()
        except OSError as e:
            described = describe_environment_error(e)
            if described is None:
                raise
            raise RunError(f"cannot use --output_dir {run_dir}: {described}") from None
        if lock.warning:
            log(lock.warning)

    on_main_process(accelerator, acquire)
    return lock if accelerator.is_main_process else None


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About the disk space of one checkpoint, with a margin: fp32 weights, AdamW's two moments and the stock
    export are 4 x 4 bytes per parameter (export/ is hard links); a fifth more covers tokenizer, cards and code."""
    return 5 * 4 * sum(p.numel() for p in model.parameters())


def room_problem(run_dir: Path, need: int, what: str) -> str | None:
    """What keeps the disk from holding `need` bytes (a whole checkpoint) in files of up to 2/5 of that (the
    optimizer state): too little free space, or a file-size limit; None when it fits."""
    free = shutil.disk_usage(run_dir).free
    if free < need:
        return (
            f"{run_dir} has {free / 1e9:.2f} GB free, but {what} needs about {need / 1e9:.2f} GB. Free some "
            "space or choose --output_dir on another disk."
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < need // 2:  # with a margin over the 2/5
        return (
            f"the file-size limit (ulimit -f) is {limit:,} bytes, but {what} writes files of up to about "
            f"{need * 2 // 5:,} bytes. Raise it (ulimit -f unlimited) before training."
        )
    return None


def check_room(run_dir: Path, need: int, what: str) -> None:
    """Refuse up front what the disk cannot hold (room_problem)."""
    problem = room_problem(run_dir, need, what)
    if problem:
        raise RunError(problem)


def verify_data(cfg: TrainConfig, accelerator: Accelerator, log) -> None:
    """The main process checks every shard against the SHA-256 in the data's manifest.json (data_prep.py wrote
    it), once per start: about 0.25 s per 100M-token shard and core (bench/bench_verify.py)."""

    def check():
        if not Path(cfg.data.data_dir).is_dir():
            return  # a glob or a single file: no manifest to check against
        start = time.perf_counter()
        if check_shards(cfg.data.data_dir):
            log(f"data: every shard matches manifest.json ({time.perf_counter() - start:.1f}s)")

    if cfg.data.verify_data and cfg.data.dataset is None:  # a stream has no shards to check
        on_main_process(accelerator, check)


@contextlib.contextmanager
def explained_failures(run_dir: Path):
    """Ctrl-C, and failures of the environment (disk, permissions), end with a message that says truthfully what
    can be resumed; other errors pass unchanged."""
    checkpoints = run_dir / "checkpoints"
    try:
        yield
    except KeyboardInterrupt:
        speaker = os.environ.get("RANK", "0") == "0"  # one message, not one per process
        raise Stop(
            f"interrupted: {ckpt.resume_hint(checkpoints)}" if speaker else "", 130
        ) from None
    except (ConfigError, RunError, DataError):
        raise
    except Exception as e:
        described = describe_environment_error(e)
        if described is None:
            raise
        saved = ckpt.list_checkpoints(checkpoints)
        raise RunError(
            described + (f". Nothing is lost: {ckpt.resume_hint(checkpoints)}" if saved else "")
        ) from e


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


def tracker_init_kwargs(cfg: TrainConfig, run_dir: Path, step: int) -> dict:
    """`init_trackers` arguments so that a resumed run continues its logs rather than repeating steps.

    TensorBoard: `purge_step` hides the events a crashed run logged after the checkpoint we resume from (step; 0
    for a start before any checkpoint), as metrics.jsonl drops its lines. Weights & Biases: the run id is kept in
    the run folder and passed back with resume="allow", so a resumed training continues the same W&B run.
    """
    kwargs = {"tensorboard": {"purge_step": step + 1}}
    trackers = {t.strip() for t in cfg.run.log_with.split(",")}
    if trackers & {"wandb", "all"}:
        id_file = run_dir / WANDB_ID_FILE
        if not id_file.is_file():
            write_atomic(id_file, secrets.token_hex(8) + "\n")
        run_id = id_file.read_text().strip()
        kwargs["wandb"] = {"name": run_dir.name, "id": run_id, "resume": "allow"}
    return kwargs


def peak_flops(cfg: TrainConfig, accelerator: Accelerator) -> float | None:
    """Dense bf16 peak FLOP/s of one device for MFU: --peak_tflops, else the GPU table (None on CPU)."""
    if cfg.run.peak_tflops:
        return cfg.run.peak_tflops * 1e12
    on_cuda = accelerator.device.type == "cuda"
    return peak_bf16_flops(torch.cuda.get_device_name()) if on_cuda else None


# ------------------------------------------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(argv)
    with explained_failures(Path(cfg.run.output_dir)), contextlib.ExitStack() as cleanup:
        return train(cfg, cleanup)


def train(cfg: TrainConfig, cleanup: contextlib.ExitStack) -> Path:
    """The run itself; `cleanup` releases the run folder's lock and the signal handlers when it ends."""
    t_start = time.time()
    data, optim = cfg.data, cfg.optim
    check_data_dir(cfg)
    try:
        encoding = get_gpt2_encoding()
    except RuntimeError as e:  # offline without a cached vocabulary: the message gives the fix
        raise ConfigError(str(e)) from None
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars at every checkpoint
    run_dir = Path(cfg.run.output_dir)
    accelerator = make_accelerator(cfg, run_dir)
    # --push_to_hub without a token or write access fails here, not at the first checkpoint
    uploader = open_hub(cfg, accelerator, run_dir)
    is_main = accelerator.is_main_process
    log = tqdm.write if is_main else (lambda *_: None)
    lock = claim_run_dir(run_dir, accelerator, log)  # one run per folder, refused at once
    if lock is not None:
        cleanup.callback(lock.release)
    found = find_checkpoint(cfg, run_dir)  # refused before anything is written
    verify_data(cfg, accelerator, log)
    stop = cleanup.enter_context(StopRequest())  # SIGTERM, SIGUSR1, launcher exit: save and stop

    set_seed(cfg.run.seed)  # the same initial weights on every rank
    # raw_model: the plain module for evaluation, sampling and export (shares parameters with `model`)
    raw_model = build_model(cfg)
    check_optimizer_support(cfg, accelerator.distributed_type)
    optimizers = build_optimizers(raw_model, cfg, accelerator.device)
    model, *optimizers = accelerator.prepare(raw_model, *optimizers)
    register_weight_hooks(accelerator, raw_model)
    on_main_process(
        accelerator, lambda: check_room(run_dir, checkpoint_bytes(raw_model), "a checkpoint")
    )
    loader = make_loader(cfg, accelerator)
    cleanup.callback(loader.close)  # a stream's reader threads, also when the run fails
    state = resume(accelerator, loader, cfg, found)
    step, tokens_seen = state.get("step", 0), state.get("tokens_seen", 0)
    last_eval = {
        k: state.get(k)
        for k in ("val_loss", "val_step", "hellaswag_acc_norm", "hellaswag_examples")
    }
    # Loading the HellaSwag file is a check too: before anything is written.
    evaluator = Evaluator(cfg, accelerator, encoding, run_dir, log, loader)
    record_run(cfg, accelerator, run_dir, log, start_step=step, resumed_from=found and str(found))
    if is_main:  # the steps logged after the checkpoint are redone
        ckpt.truncate_metrics(run_dir / "metrics.jsonl", step)
        log(
            f"resumed from step {step} ({run_dir})"
            if step
            else f"training from scratch in {run_dir}"
        )

    checkpointer = Checkpointer(
        cfg, accelerator, model, raw_model, loader, run_dir, encoding, uploader
    )
    accelerator.init_trackers(
        cfg.run.project_name,
        config=tracker_config(cfg),
        init_kwargs=tracker_init_kwargs(cfg, run_dir, step) if is_main else {},
    )
    flops_per_token = estimate_flops_per_token(raw_model.config, data.seq_len)
    peak = peak_flops(cfg, accelerator)
    bar = tqdm(
        total=optim.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True
    )
    cleanup.callback(bar.close)  # an error message then starts on a line of its own
    guard = DivergenceGuard(optim.max_bad_steps)
    if step and evaluator.due(step) and last_eval.get("val_step") != step:
        last_eval = {
            **evaluator(raw_model, step),
            "val_step": step,
        }  # a stop saved before evaluating

    model.train()
    while step < optim.max_steps:
        t0 = time.perf_counter()
        lrs = set_lrs(optimizers, step, optim)
        result = train_step(accelerator, model, optimizers, loader, optim.grad_clip, stop)
        dt = time.perf_counter() - t0
        step, tokens_seen = step + 1, tokens_seen + data.total_batch_tokens
        tokens_per_sec = data.total_batch_tokens / dt
        row = {"step": step, "loss": result.loss, **lrs, "grad_norm": result.grad_norm}
        row |= {"tokens_per_sec": tokens_per_sec, "step_time_ms": dt * 1000, "tokens": tokens_seen}
        step_mfu = mfu(flops_per_token, tokens_per_sec, peak, accelerator.num_processes)
        row |= {} if math.isnan(step_mfu) else {"mfu": step_mfu}
        row |= {"skipped": True} if result.skipped else {}
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if is_main:
            append_jsonl(run_dir / "metrics.jsonl", row)
            bar.set_postfix_str(progress_line(row), refresh=False)
            bar.update(1)
        in_streak = check_divergence(guard, result, step, log, run_dir, cfg)
        if result.stop and step < optim.max_steps:  # preemption: save this step at once, then exit
            saved = save_checkpoint(
                checkpointer,
                accelerator,
                raw_model,
                trainer_state(cfg, accelerator, step, tokens_seen, last_eval),
                run_dir,
                cfg,
            )
            raise preempted(stop, step, saved, is_main)
        if in_streak:
            continue  # no evaluation or checkpoint in the middle of a streak of bad steps

        if evaluator.due(step):
            last_eval = {**evaluator(raw_model, step), "val_step": step}
        if checkpointer.due(step):
            state = trainer_state(cfg, accelerator, step, tokens_seen, last_eval)
            log(
                f"checkpoint {save_checkpoint(checkpointer, accelerator, raw_model, state, run_dir, cfg)}"
            )

    bar.close()
    stop.close()  # from here on SIGTERM ends the process as usual (the final checkpoint is written)
    accelerator.end_training()
    checkpointer.close(log)
    log(f"done: {step} steps in {time.time() - t_start:.0f}s; model in {run_dir / 'export'}")
    return run_dir


def check_divergence(
    guard: DivergenceGuard, result: StepResult, step: int, log, run_dir, cfg
) -> bool:
    """Count the step in the divergence guard and report a bad one. True while a streak of bad steps goes on
    (before the last step); RunError once the streak reaches --max_bad_steps."""
    guard.update(step, result.bad, result.loss)
    if not result.bad:
        return False
    log(
        f"step {step}: loss {result.loss}, gradient norm {result.grad_norm}: not finite, update skipped "
        f"({guard.streak} in a row; the run stops at {guard.max_bad_steps})"
    )
    if guard.exhausted:
        raise diverged(guard.describe(step), run_dir, cfg)
    return step < cfg.optim.max_steps


def preempted(stop: StopRequest, step: int, saved: Path | None, is_main: bool) -> Stop:
    """The orderly end after a stop request: the checkpoint at this step is complete."""
    reason = stop.reason or "another process was asked to stop"
    message = (
        f"stopped at step {step} ({reason}): checkpoint {saved} is complete. Continue with --resume latest "
        f"(exit code {PREEMPTED_EXIT_CODE})."
    )
    return Stop(message if is_main else "", PREEMPTED_EXIT_CODE)


def progress_line(row: dict) -> str:
    """The progress bar's postfix for one metrics row."""
    line = f"loss {row['loss']:.4f} lr {row['lr']:.2e} gnorm {row['grad_norm']:.2f} {row['step_time_ms']:.0f}ms "
    line += f"{row['tokens_per_sec'] / 1e3:.1f}k tok/s"
    return line + (f" mfu {row['mfu']:.1%}" if "mfu" in row else "")


if __name__ == "__main__":
    cli.run(main, errors=(DataError, EvaluationInputError, FileNotFoundError))
