"""The training loop's periodic evaluation: validation loss, HellaSwag and samples, logged like the steps.

It calls the same kernels as evaluate_gpt2.py (`evaluation/scoring.py`), on the uncompiled module, which shares its
parameters with the compiled, distributed one: no recompiling for every new shape (HellaSwag rows and generation
steps vary in length), and no DDP collectives, which would hang when ranks run different numbers of batches.

Under FSDP2 that module is itself sharded (fully_shard works in place): every process evaluates its share of the
windows and examples through the sharded forward, which gathers the parameters (scoring.py makes every process run
as many forwards), and every process samples, generate() keeping them in step (`synced_gpus`); the main process
logs. FSDP1 (fsdp_version: 1) flattens the parameters into shards the module cannot run on: no evaluation there.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator, DistributedType

from ..base.config import TrainConfig
from ..base.errors import DataError, HellaSwagUnavailable
from ..base.run_folder import RunFolder
from ..checkpointing.checkpoints import LastEval
from ..checkpointing.folders import resume_hint
from ..evaluation.hellaswag import load_hellaswag
from ..evaluation.models import is_fully_sharded, reshard
from ..evaluation.scoring import score_hellaswag, validation_loss
from .tracking import log_to_trackers


def evaluates(accelerator: Accelerator) -> bool:
    """Whether the run can evaluate: every setup but FSDP1, whose flat parameter shards no module can run on."""
    return accelerator.distributed_type != DistributedType.FSDP or accelerator.is_fsdp2


def training_hellaswag(cfg: TrainConfig, accelerator: Accelerator, log) -> list[dict] | None:
    """The HellaSwag examples the run scores (None: not asked for, FSDP1, or offline without a local file, which
    only warns). A malformed file is refused: loading is one of the run's start-up checks."""
    if not cfg.eval.hellaswag or not evaluates(accelerator):
        return None
    with accelerator.main_process_first():  # the first process downloads into the cache, then the rest
        try:
            return load_hellaswag(cfg.eval.hellaswag_file, limit=cfg.eval.hellaswag_limit)
        except HellaSwagUnavailable as e:  # offline and no local file: warn once, in one line, and train on
            log(
                "warning: no HellaSwag in this run: it could not be downloaded (offline?). Put hellaswag_val.jsonl "
                f"at {e.cache} or pass --hellaswag_file PATH; --hellaswag false turns it off"
            )
            return None


class Evaluator:
    """Evaluates the model at the steps `due` says; `val_data` is what `validation_loss` reads (the shards' folder,
    or a stream's first tokens: the same tokens as the val shard data_prep.py would write from it)."""

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Accelerator,
        encoding,
        folder: RunFolder,
        log,
        val_data,
        hellaswag: list[dict] | None = None,
        line: int = 1,
        restore_hint: str | None = None,
    ):
        self.cfg, self.accelerator, self.encoding = cfg, accelerator, encoding
        self.folder, self.log, self.val_data, self.hellaswag = folder, log, val_data, hellaswag
        self.restore_hint = restore_hint  # how to bring the data back should it disappear (DataSource's)
        self.line = line  # the line of training (metrics.jsonl says it from line 2 on, as the step lines do)
        self.enabled = evaluates(accelerator)
        if not self.enabled:
            log(
                "warning: no evaluation during FSDP training with fsdp_version 1 (its flat parameter shards cannot "
                "run the model's forward): use fsdp_version: 2, or run evaluate_gpt2.py on the exports"
            )

    def due(self, step: int) -> bool:
        return self.enabled and self.cfg.optim.is_due(step, self.cfg.eval.eval_every)

    def __call__(self, model, step: int) -> LastEval:
        evals, data, accelerator = self.cfg.eval, self.cfg.data, self.accelerator
        batch_size = evals.eval_batch_size or data.micro_batch_size
        try:
            val_loss = validation_loss(model, self.val_data, evals.val_tokens, batch_size, data.seq_len, accelerator)
        except DataError as e:  # the data folder removed or damaged during the run
            hint = f" {self.restore_hint}" if self.restore_hint else ""
            raise DataError(
                f"step {step}: the validation data cannot be read any more ({e}).{hint} Then "
                f"{resume_hint(self.folder.checkpoints)} (it evaluates that step if it was not)."
            ) from e
        results = {"val_loss": val_loss}
        broken = not math.isfinite(val_loss)  # the same on every process (reduced)
        if broken:
            self.log(
                f"step {step}: validation loss {val_loss}: the model's outputs are not finite, so HellaSwag and "
                "samples are skipped"
            )
        if self.hellaswag is not None and not broken:
            batch = evals.eval_batch_size or 16
            scores = score_hellaswag(model, self.encoding, self.hellaswag, batch, accelerator=accelerator)
            results |= {"hellaswag_acc_norm": scores["acc_norm"], "hellaswag_acc": scores["acc"]}
        log_to_trackers(accelerator, {"step": step, **results})
        sharded = is_fully_sharded(model)  # FSDP2: every process samples, in step with the others
        wanted = evals.num_samples and not broken and (accelerator.is_main_process or sharded)
        samples = self.sample(model, step) if wanted else []
        if accelerator.is_main_process:
            self.folder.append_metrics({"step": step, **results} | ({"line": self.line} if self.line > 1 else {}))
            self.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
            for i, text in enumerate(samples):
                self.log(f"--- sample {i} at step {step}:\n{text}")
        examples = len(self.hellaswag) if self.hellaswag is not None else None
        return LastEval(val_step=step, hellaswag_examples=examples, **results)

    @torch.no_grad()
    def sample(self, model, step: int) -> list[str]:
        """Top-k samples with the KV cache (generate), on a forked RNG so training randomness is untouched. Under
        FSDP2 every process calls it: generate's `synced_gpus` runs the forward on all until all are done (the same
        seed and weights give every process the same samples)."""
        evals, device = self.cfg.eval, self.accelerator.device
        prompt = [self.encoding.encode(evals.sample_prompt)] * evals.num_samples
        prompt = torch.tensor(prompt, device=device)  # (n, P)
        was_training = model.training
        model.eval()
        cuda_rng = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_rng):  # autocast: prepare() set it on the module
            torch.manual_seed(self.cfg.run.seed + step)
            # (n, P + sample_tokens); remove_invalid_values: a bad model's NaN/inf logits are sampled without a crash
            kwargs = {"max_new_tokens": evals.sample_tokens, "do_sample": True, "top_k": 50}
            kwargs["synced_gpus"] = is_fully_sharded(model)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), remove_invalid_values=True, **kwargs)
        model.train(was_training)
        reshard(model)  # FSDP2: the shards back, as training left them
        n_vocab = self.encoding.n_vocab  # a bad model may even sample the padding ids
        return [self.encoding.decode([t for t in row.tolist() if t < n_vocab]) for row in out]
