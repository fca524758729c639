"""The processes of tests/test_fsdp.py: a tiny GPT-2 sharded by FSDP2 as accelerate shards it, run through the
functions train.py calls, against the same weights whole in one process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT

accelerate runs FSDP on GPUs only: an FSDP accelerate config on CPU processes leaves them unconnected, and with
`use_cpu` it becomes DDP. So the processes here join a gloo group through accelerate's Accelerator for CPU processes
(MULTI_CPU, whose reduce and gather the evaluation and the step use), and the model is sharded by accelerate's own
FSDP2 function, `fsdp2_prepare_model`, with the plugin of README's FSDP config (fsdp_version 2,
TRANSFORMER_BASED_WRAP on GPT2ReproBlock): torch's fully_shard on each block, on the embeddings + final LayerNorm +
tied head as one group, and on the root. In this order, as a resumed run can meet them (an evaluation first):
  1. periodic_eval.Evaluator at step 0 (validation loss, HellaSwag, samples; every process samples);
  2. two optimizer steps by step.train_step, each process on its half of the global batch (the gradient norm is
     FSDP2's DTensor); the whole model, in every process, on the whole batch;
  3. the weights gathered as a checkpoint gathers them under FSDP2 (accelerate's get_state_dict call:
     get_model_state_dict with full_state_dict and cpu_offload), written by save_model_files as Checkpoints._write
     writes them; a one-process model loaded from them;
  4. the Evaluator at step 2, on the sharded model and on that one-process model;
  5. nonfinite_parameters with a NaN in one process's shard only, the count summed as Checkpoints.save sums it.
Rank 0 writes OUT (torch.save): the figures of each pair, and the checkpoint folder's path.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

GLOBAL_BATCH, SEQ = 4, 32  # sequences per optimizer step, all processes together
SETTINGS = {
    "seq_len": str(SEQ),
    "micro_batch_size": str(GLOBAL_BATCH // 2),
    "total_batch_tokens": str(GLOBAL_BATCH * SEQ),
    "max_steps": "10",
    "warmup_steps": "1",
    "max_lr": "1e-2",
    "val_tokens": str(SEQ * 7),  # 7 windows: 4 for process 0 and 3 for process 1, in batches of 3: 2 and 1 forwards
    "eval_batch_size": "3",  # HellaSwag too: 7 examples, 4 and 3, so 2 and 1 batches
    "num_samples": "2",
    "sample_tokens": "6",
}


class Batches:
    """The data source train_step reads: this process's rows of each step's global batch (the whole batch for
    `world=1`), cut from a learnable token stream."""

    def __init__(self, tokens, rank: int, world: int):
        self.tokens, self.rank, self.world, self.step = tokens, rank, world, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            0, len(self.tokens) - SEQ - 1, (GLOBAL_BATCH,), generator=torch.Generator().manual_seed(self.step)
        )
        self.step += 1
        rows = torch.stack([torch.from_numpy(self.tokens[s : s + SEQ + 1].astype("int64")) for s in starts.tolist()])
        rows = rows.chunk(self.world)[self.rank]  # (GLOBAL_BATCH / world, SEQ + 1)
        return rows[:, :-1], rows[:, 1:]


def shard_as_accelerate_does(model, accelerator):
    """accelerate's fsdp2_prepare_model with README's FSDP plugin. The function reads the plugin, the device, the
    precision and the process's rank from its accelerator argument: this one's are a CPU process's (accelerate's
    own Accelerator for CPUs carries no FSDP plugin)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["GPT2ReproBlock"],
        state_dict_type="SHARDED_STATE_DICT",
    )
    fsdp_accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision=accelerator.mixed_precision,
        is_main_process=accelerator.is_main_process,
        device=accelerator.device,
        torch_device_mesh=None,
    )
    return fsdp2_prepare_model(fsdp_accelerator, model)


def evaluate(evaluator, model, step: int) -> dict:
    """What the run's evaluation gives at `step` (the Evaluator, as train.py calls it), and every process's samples
    (Evaluator.sample called once more on each: under FSDP every process samples)."""
    said = []
    evaluator.log = said.append
    result = evaluator(model, step)
    samples = evaluator.sample(model, step)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, samples)
    return {"result": result, "logged": [s for s in said if s.startswith("--- sample")], "samples": every}


def one_process(model, cfg, encoding, val_tokens, examples, step: int) -> dict:
    """The figures of one process holding the whole model: the evaluation kernels without an accelerator, and the
    Evaluator's samples (which need no collective for a model that is not sharded)."""
    from gpt2_repro.evaluation.scoring import score_hellaswag, validation_loss

    evals = cfg.eval
    loss = validation_loss(model, val_tokens, evals.val_tokens, evals.eval_batch_size, cfg.data.seq_len)
    scores = score_hellaswag(model, encoding, examples, evals.eval_batch_size)
    return {"val_loss": loss, "acc_norm": scores["acc_norm"], "acc": scores["acc"]}


def train(accelerator, model, optimizers, cfg, source, steps: int) -> list:
    """`steps` optimizer steps by train_step, as train.py's loop runs them: [(loss, grad_norm, skipped), ...]."""
    from gpt2_repro.training.optim import set_lrs
    from gpt2_repro.training.step import train_step

    model.train()
    results = []
    for step in range(steps):
        set_lrs(optimizers, step, cfg.optim)
        result = train_step(accelerator, model, optimizers, source, cfg.optim.grad_clip)
        results.append((result.loss, result.grad_norm, result.skipped))
    return results


def gathered_checkpoint(model, cfg, encoding, folder: Path) -> Path:
    """The weights as Checkpoints._write gathers them under FSDP2 (accelerate's get_state_dict makes this call),
    written by save_model_files on the main process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from gpt2_repro.checkpointing.checkpoints import save_model_files
    from gpt2_repro.data.tokenizer import build_hf_tokenizer

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)  # a collective; the whole dict on rank 0 only
    if torch.distributed.get_rank() == 0:
        card = {"config": cfg.to_dict(), "step": 2, "tokens": 2 * GLOBAL_BATCH * SEQ}
        save_model_files(model, folder, build_hf_tokenizer(encoding), card, state_dict=full)
    torch.distributed.barrier()
    return folder


def nonfinite_count(accelerator, model) -> tuple[list[str], float]:
    """A NaN in one weight of process 1's shard: (the names this process finds, the count summed over processes,
    as Checkpoints.save sums it)."""
    from gpt2_repro.evaluation.models import nonfinite_parameters

    if accelerator.process_index == 1:
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.to_local()[0, 0] = float("nan")
    bad = nonfinite_parameters(model)
    count = accelerator.reduce(torch.tensor(float(len(bad)), device=accelerator.device), reduction="sum")
    return bad, count.item()


def main() -> None:
    from accelerate import Accelerator

    from gpt2_repro.base.config import load_config
    from gpt2_repro.base.run_folder import RunFolder
    from gpt2_repro.data.tokenizer import get_gpt2_encoding
    from gpt2_repro.evaluation.scoring import validation_loss
    from gpt2_repro.training.optim import build_optimizers
    from gpt2_repro.training.periodic_eval import Evaluator
    from modeling_gpt2_repro import GPT2ReproForCausalLM
    from synthetic import hellaswag_examples, learnable_tokens, tiny_repro

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)  # joins the gloo group of the torchrun processes
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg, encoding = load_config(ROOT / "configs" / "tiny.yaml", SETTINGS), get_gpt2_encoding()
    tokens = learnable_tokens(6000)
    val_tokens, examples = tokens[:2000].astype("uint16"), hellaswag_examples(7)
    whole, sharded = tiny_repro(seed=3), shard_as_accelerate_does(tiny_repro(seed=3), accelerator)
    # the optimizers exist before any forward, as in train.py (built there before prepare, which hands them the shards)
    optimizers = [build_optimizers(model, cfg, accelerator.device) for model in (sharded, whole)]
    (out.parent / "run").mkdir(exist_ok=True)  # where the main process's evaluation lines go
    evaluator = Evaluator(cfg, accelerator, encoding, RunFolder(out.parent / "run"), print, val_tokens, examples)
    record = {"types": (type(sharded).__name__, type(sharded.transformer.h[0].attn.c_attn.weight).__name__)}
    record["step0"] = (evaluate(evaluator, sharded, 0), one_process(whole, cfg, encoding, val_tokens, examples, 0))
    record["step0_samples"] = evaluator.sample(whole, 0)
    record["resharded"] = {"evaluation": sorted({type(p).__name__ for p in sharded.parameters()})}
    validation_loss(sharded, val_tokens, cfg.eval.val_tokens, 3, SEQ, accelerator)  # the kernel alone, then
    record["resharded"]["validation_loss"] = sorted({type(p).__name__ for p in sharded.parameters()})
    record["train"] = (
        train(accelerator, sharded, optimizers[0], cfg, Batches(tokens[2000:], rank, world), 2),
        train(accelerator, whole, optimizers[1], cfg, Batches(tokens[2000:], 0, 1), 2),
    )
    record["weights"] = (
        {n: p.full_tensor() for n, p in sharded.named_parameters()},
        {n: p.detach().clone() for n, p in whole.named_parameters()},
    )
    folder = gathered_checkpoint(sharded, cfg, encoding, out.parent / "checkpoint")
    loaded = GPT2ReproForCausalLM.from_pretrained(folder)  # the project's class: no remote code per process
    record["step2"] = (evaluate(evaluator, sharded, 2), one_process(loaded, cfg, encoding, val_tokens, examples, 2))
    record["step2_samples"] = evaluator.sample(loaded, 2)
    record["loaded"] = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    record["nonfinite"] = nonfinite_count(accelerator, sharded)
    every = [None] * world
    torch.distributed.all_gather_object(every, record["nonfinite"])
    record["nonfinite"], record["checkpoint"] = every, str(folder)
    if rank == 0:
        torch.save(record, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group, as train.py does (see muon_worker.py)


if __name__ == "__main__":
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    main()
