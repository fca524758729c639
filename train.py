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
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

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
from atomic_io import link_or_copy, link_tree, strict_json, write_atomic, write_json_atomic
from cli import ConfigError
from evaluate_gpt2 import HellaSwagUnavailable, load_hellaswag, score_hellaswag, validation_loss
from gpt2_tokenizer import build_hf_tokenizer, get_gpt2_encoding
from hub import (
    STOCK_GPT2_BRANCH,
    HubAccessError,
    HubUploader,
    manifest_source,
    write_model_card,
)
from modeling_gpt2_repro import GPT2ReproForCausalLM, estimate_flops_per_token
from run_info import collect_run_info, mfu, peak_bf16_flops
from token_data import DataError, TokenShardLoader, iter_val_batches
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
    """Fail before anything starts when there is no prepared data or too little validation data for val_tokens."""
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


# ----------------------------------------------------------------------------------------------- one step


def train_step(
    accelerator: Accelerator, model, optimizers: list, loader, grad_clip: float
) -> tuple[float, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches per process.

    `optimizers` (AdamW, or AdamW + Muon) are stepped and zeroed on the synced micro-step; their LRs are set
    before (set_lrs). Returns (loss averaged over every micro-batch of every process, global gradient norm
    before clipping).
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
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
            for optimizer in optimizers:  # both no-ops until the gradients are synced
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    mean_loss = accelerator.reduce(loss_sum / accum, reduction="mean")
    loss_value, norm_value = torch.stack(
        [mean_loss, getattr(grad_norm, "full_tensor", lambda: grad_norm)().detach().float()]
    ).tolist()  # one device sync
    return loss_value, norm_value


# --------------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Validation loss, HellaSwag and samples (evaluate_gpt2's functions), logged like the training steps.

    They run on the uncompiled module, which shares its parameters with the compiled, distributed one: no
    recompiling for every new shape (HellaSwag rows and generation steps vary in length), and no DDP collectives,
    which would hang when ranks run different numbers of batches.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, encoding, run_dir: Path, log):
        self.cfg, self.accelerator, self.encoding, self.run_dir, self.log = (
            cfg,
            accelerator,
            encoding,
            run_dir,
            log,
        )
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
            data.data_dir,
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
            )  # (n, P + sample_tokens)
        model.train(was_training)
        return [self.encoding.decode(row.tolist()) for row in out]


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
        self.card = {"config": cfg.to_dict(), "data_source": manifest_source(cfg.data.data_dir)}
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


def make_loader(cfg: TrainConfig, accelerator: Accelerator) -> TokenShardLoader:
    """This process's training batches: the loader shards by rank itself (never passed to `prepare`)."""
    data = cfg.data
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
    # --push_to_hub without a token or write access fails here, not at the first checkpoint
    uploader = open_hub(cfg, accelerator, run_dir)
    is_main = accelerator.is_main_process
    log = tqdm.write if is_main else (lambda *_: None)
    record_run(cfg, accelerator, run_dir, log)

    set_seed(cfg.run.seed)  # the same initial weights on every rank
    # raw_model: the plain module for evaluation, sampling and export (shares parameters with `model`)
    raw_model = build_model(cfg)
    check_optimizer_support(cfg, accelerator.distributed_type)
    optimizers = build_optimizers(raw_model, cfg, accelerator.device)
    model, *optimizers = accelerator.prepare(raw_model, *optimizers)
    register_weight_hooks(accelerator, raw_model)
    loader = make_loader(cfg, accelerator)
    state = resume(accelerator, loader, cfg, run_dir)
    step, tokens_seen = state.get("step", 0), state.get("tokens_seen", 0)
    last_eval = {
        k: state.get(k)
        for k in ("val_loss", "val_step", "hellaswag_acc_norm", "hellaswag_examples")
    }
    if is_main:  # the steps logged after the checkpoint are redone
        ckpt.truncate_metrics(run_dir / "metrics.jsonl", step)
        log(
            f"resumed from step {step} ({run_dir})"
            if step
            else f"training from scratch in {run_dir}"
        )

    evaluator = Evaluator(cfg, accelerator, encoding, run_dir, log)
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

    model.train()
    while step < optim.max_steps:
        t0 = time.perf_counter()
        lrs = set_lrs(optimizers, step, optim)
        loss, grad_norm = train_step(accelerator, model, optimizers, loader, optim.grad_clip)
        dt = time.perf_counter() - t0
        step, tokens_seen = step + 1, tokens_seen + data.total_batch_tokens
        tokens_per_sec = data.total_batch_tokens / dt
        row = {"step": step, "loss": loss, **lrs, "grad_norm": grad_norm}
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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: continue with --resume latest", file=sys.stderr)
        sys.exit(130)
