"""The training run's checkpoints: saved every checkpoint_every steps and at the end, restored on resume.

Layout and guarantees of the folders: `checkpoint.py`. A checkpoint is itself a model folder (`save_model_files`);
accelerate's save_state adds the optimizer, RNG states and its micro-step counter (not the weights: see
`register_weight_hooks`); next to them go each process's data position, run_state.json (what a resume needs) and
trainer_state.json (the same in transformers' TrainerState layout). The run's
export/ and export-gpt2/ are hard links to the newest checkpoint's model files, uploaded to the Hub when asked.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import set_seed

from modeling_gpt2_repro import GPT2ReproForCausalLM

from .atomic_io import follow_umask, link_or_copy, link_tree, write_json_atomic
from .cards import write_model_card
from .checkpoint import (
    RUN_STATE,
    STOCK_EXPORT,
    TRAINER_STATE,
    commit_checkpoint,
    list_checkpoints,
    load_model_weights,
    read_run_state,
    resume_hint,
    temp_checkpoint_dir,
)
from .config import TrainConfig
from .errors import RunError, describe_environment_error, on_main_process
from .evaluator import LastEval
from .hub import STOCK_GPT2_BRANCH, HubUploader
from .run_folder import check_room, checkpoint_bytes, room_problem
from .shards import manifest_source
from .stopping import diverged, nonfinite_parameters
from .tokenizer import build_hf_tokenizer


class Checkpointer:
    """Saves and restores the run: `save` at the steps `due` says, `restore` on resume, `close` at the end."""

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
        self.checkpoints = run_dir / "checkpoints"
        self.tokenizer = None
        if accelerator.is_main_process:
            self.tokenizer = build_hf_tokenizer(encoding, model_max_length=cfg.model.n_positions)
        self.uploader = uploader
        source = loader.source.identity if cfg.data.dataset is not None else None
        self.card = {"config": cfg.to_dict(), "data_source": source or manifest_source(cfg.data.data_dir)}
        self.card["repo_id"] = cfg.checkpoint.push_to_hub
        self.line = 1  # the line of training the checkpoints belong to (resume.start_line)
        register_weight_hooks(accelerator, raw_model)

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint.checkpoint_every
        return step == self.cfg.optim.max_steps or bool(every and step % every == 0)

    def run_state(self, step: int, tokens_seen: int, last_eval: LastEval) -> dict:
        """run_state.json of a checkpoint: where training stands, and the settings it is bound to."""
        data = self.cfg.data
        state = {"step": step, "tokens_seen": tokens_seen, "num_processes": self.accelerator.num_processes}
        state |= {"micro_batch_size": data.micro_batch_size, "seq_len": data.seq_len, "line": self.line}
        if hasattr(self.loader, "shard_files"):  # shards, not a stream: what the data position refers to
            state["shard_files"] = self.loader.shard_files()
        return state | asdict(last_eval) | {"config": self.cfg.to_dict()}

    def trainer_state(self, run_state: dict) -> dict:
        """The run state in the layout of transformers' TrainerState (`TrainerState.load_from_json` reads it), for the
        tools that read a Trainer checkpoint's trainer_state.json: step, tokens, intervals, the latest evaluation."""
        from transformers import TrainerState

        cfg, history = self.cfg, []
        if run_state.get("val_loss") is not None:
            history.append({"step": run_state["val_step"], "eval_loss": run_state["val_loss"]})
            if run_state.get("hellaswag_acc_norm") is not None:
                history[-1]["eval_hellaswag_acc_norm"] = run_state["hellaswag_acc_norm"]
        state = TrainerState(
            global_step=run_state["step"],
            max_steps=cfg.optim.max_steps,
            logging_steps=1,
            eval_steps=cfg.eval.eval_every,
            save_steps=cfg.checkpoint.checkpoint_every,
            train_batch_size=cfg.data.micro_batch_size,
            num_input_tokens_seen=run_state["tokens_seen"],
            log_history=history,
        )
        return asdict(state)

    def save(self, step: int, tokens_seen: int, last_eval: LastEval) -> Path | None:
        """Checkpoint `step`, guarded: never of non-finite weights (RunError naming the last good checkpoint), not
        without the disk space for it, and a failed or interrupted save removes its temporary folder (the previous
        checkpoints are untouched: they are replaced only by a complete new one). Returns the checkpoint folder
        (None on processes other than the main one)."""
        acc = self.accelerator
        bad = nonfinite_parameters(self.raw_model)
        count = acc.reduce(torch.tensor(float(len(bad)), device=acc.device), reduction="sum")
        if count.item():  # FSDP: each process checked its own shards
            names = f" (e.g. {', '.join(bad[:3])})" if bad else ""
            what = f"the weights at step {step} hold NaN or inf{names}"
            raise diverged(what, list_checkpoints(self.checkpoints), self.cfg.optim)
        need = checkpoint_bytes(sum(p.numel() for p in self.raw_model.parameters()))
        on_main_process(acc, lambda: check_room(self.run_dir, need, f"checkpoint step {step}"))
        try:
            return self._write(self.run_state(step, tokens_seen, last_eval))
        except BaseException as e:
            if acc.is_main_process:
                shutil.rmtree(temp_checkpoint_dir(self.checkpoints, step), ignore_errors=True)
            # torch.save reports a short write as "unexpected pos", without an errno: look at the disk itself.
            problem = None
            if isinstance(e, Exception) and describe_environment_error(e) is None:
                problem = room_problem(self.run_dir, need, f"checkpoint step {step}")
            if problem:
                raise RunError(
                    f"checkpoint step {step} could not be written ({type(e).__name__}: {e}): {problem} Then "
                    f"{resume_hint(self.checkpoints)}"
                ) from e
            raise

    def _write(self, run_state: dict) -> Path | None:
        acc, run_dir, step = self.accelerator, self.run_dir, run_state["step"]
        tmp = temp_checkpoint_dir(self.checkpoints, step)
        full_state = None  # under FSDP, gather the whole model (a collective: every rank calls it)
        if acc.distributed_type == DistributedType.FSDP:  # FSDP2 shards raw_model in place; it has no _orig_mod.
            full_state = acc.get_state_dict(self.raw_model if acc.is_fsdp2 else self.model)
        model_files = []
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving this same step
            card = {**self.card, "step": step, "tokens": run_state["tokens_seen"]}
            card |= {k: run_state.get(k) for k in ("val_loss", "val_step", "hellaswag_acc_norm", "hellaswag_examples")}
            model_files = save_model_files(self.raw_model, tmp, self.tokenizer, card, state_dict=full_state)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # optimizer, RNG states, scaler (the weights: save_model_files)
        write_json_atomic(tmp / f"loader_rank{acc.process_index}.json", self.loader.state_dict())
        if acc.is_main_process:
            write_json_atomic(tmp / RUN_STATE, {**run_state, "model_files": model_files})
            write_json_atomic(tmp / TRAINER_STATE, self.trainer_state(run_state))
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            final = commit_checkpoint(tmp, self.cfg.checkpoint.keep_last)
            link_tree(final, run_dir / "export", names=model_files)
            link_tree(final / STOCK_EXPORT, run_dir / STOCK_EXPORT)
            if self.uploader:
                self.uploader.submit(run_dir / "export", f"step {step}")
                self.uploader.submit(run_dir / STOCK_EXPORT, f"step {step}", revision=STOCK_GPT2_BRANCH)
        acc.wait_for_everyone()
        return final

    def restore(self, found: Path | None) -> dict:
        """Restore checkpoint `found` (None: a fresh start). Returns its run state ({} for a fresh start).

        Another number of processes than the checkpoint's is fine (resume.find_checkpoint made sure the tokens
        per step are the same): the data position is global, so every process continues from it, and the weights,
        optimizer state and step are the checkpoint's. Only the per-process RNG streams (dropout, if any) cannot
        carry over; they are re-seeded from (seed, step, rank).
        """
        if found is None:
            return {}
        acc = self.accelerator
        state = read_run_state(found)
        saved_processes = state.get("num_processes", acc.num_processes)
        # A rank without random_states_<rank>.pkl (more processes than the checkpoint's) keeps its RNGs: see below.
        acc.load_state(str(found))
        acc.step = 0  # accelerate's micro-step counter: saves happen on optimizer-step boundaries
        loader_state = found / f"loader_rank{acc.process_index}.json"
        if saved_processes != acc.num_processes:
            seed = np.random.SeedSequence([self.cfg.run.seed, state["step"], acc.process_index])
            set_seed(int(seed.generate_state(1)[0]))
            loader_state = found / "loader_rank0.json"  # every rank saved the same global position
        self.loader.load_state_dict(json.loads(loader_state.read_text()))
        return state

    def close(self, log) -> None:
        if self.uploader:
            log(f"waiting for the last Hub upload to {self.uploader.repo_id}...")
            self.uploader.close()


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
    stock = folder / STOCK_EXPORT
    GPT2ReproForCausalLM.from_pretrained(folder, dtype=torch.float32).to_official_gpt2().save_pretrained(stock)
    for name in tokenizer_files:  # the same tokenizer: linked, not written twice
        link_or_copy(folder / name, stock / name)
    write_model_card(stock, **card, stock_gpt2=True)
    for files in (folder, stock):  # model.safetensors is written 0600: group-readable like the rest on a cluster
        follow_umask(files)
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
            load_model_weights(raw_model, input_dir)
            models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(load_weights)
