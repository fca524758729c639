"""What a checkpoint costs, piece by piece, at the tiny preset and at GPT-2 124M (one CPU process), against the
disk's own speed: is a stopping run's checkpoint writable inside a launcher's grace (accelerate 5 s, torchrun 30 s,
Slurm's KillWait 30 s)? The two saves train.py makes, side by side, alternating, on the same model and state:

    python bench/cluster/save_cost.py                      # both sizes; --sizes tiny for the small one only

1. The disk: `dd if=/dev/zero bs=1M count=N conv=fsync` (sequential write, flushed), MB/s.
2. `Checkpoints.save` (real model, real AdamW state after one step), the full checkpoint of the periodic saves and
   the quick one of a stop (`quick=True`: what a resume needs, the rest written at the next start), with the time
   spent in each part: the NaN check, save_pretrained (model.safetensors, config, code), the tokenizer, the model
   card, the stock GPT2LMHeadModel export (re-read, converted, saved), accelerate's save_state (optimizer, RNG
   states), commit (fsync of every file, rename, rotation) and the links. The timers wrap those functions for
   this measurement only; what runs is the real code.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SIZES = {
    "tiny": ["--config", "configs/tiny.yaml"],  # 4 x 128, vocabulary 50304: 7.2M parameters
    "124M": ["--config", "configs/gpt2_124m.yaml"],  # 12 x 768: 124.5M parameters
}


def disk_speed(folder: Path, mib: int) -> float:
    """MB/s of a flushed sequential write of `mib` MiB (dd conv=fsync)."""
    target = folder / "dd.bin"
    out = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"],
                         capture_output=True, text=True, check=True).stderr  # fmt: skip
    target.unlink()
    secs = float(re.search(r"copied, ([\d.]+) s", out).group(1))
    return mib * 1048576 / secs / 1e6


class Timers:
    """Seconds spent in named functions while a block runs (outermost call of each name only)."""

    def __init__(self):
        self.spent = collections.defaultdict(float)
        self._depth = collections.Counter()
        self._undo = []

    def wrap(self, owner, attr: str, name: str) -> None:
        own = attr in vars(owner)  # else inherited: shadowed here, and the shadow removed by undo()
        original = inspect.getattr_static(owner, attr)
        is_static = isinstance(original, staticmethod | classmethod)
        func = original.__func__ if is_static else original

        @functools.wraps(func)
        def timed(*args, **kwargs):
            key = name(args) if callable(name) else name
            self._depth[key] += 1
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self._depth[key] -= 1
                if not self._depth[key]:
                    self.spent[key] += time.perf_counter() - t0

        setattr(owner, attr, type(original)(timed) if is_static else timed)
        self._undo.append((owner, attr, original if own else None))

    def undo(self) -> None:
        for owner, attr, original in reversed(self._undo):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def fsynced(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def measure(size: str, tmp: Path, data: Path, repeats: int) -> None:
    import torch
    import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    import gpt2_repro.checkpointing.checkpoints as ckpt_mod
    from gpt2_repro.base.config import parse_args
    from gpt2_repro.base.run_folder import RunFolder
    from gpt2_repro.checkpointing.checkpoints import Checkpoints, LastEval
    from gpt2_repro.data.shard_loader import TokenShardLoader
    from gpt2_repro.data.tokenizer import get_gpt2_encoding
    from gpt2_repro.evaluation import models as models_mod
    from gpt2_repro.training.accelerator import make_accelerator
    from gpt2_repro.training.optim import build_optimizers
    from modeling_gpt2_repro import GPT2ReproForCausalLM

    transformers.utils.logging.disable_progress_bar()  # as train.py does
    folder = RunFolder(tmp / f"run_{size}")
    folder.root.mkdir()
    cfg = parse_args([*SIZES[size], "--data_dir", str(data), "--output_dir", str(folder), "--seq_len", "64",
                      "--micro_batch_size", "1", "--total_batch_tokens", "64", "--keep_last", "1",
                      "--log_with", "none"])  # fmt: skip
    acc = make_accelerator(cfg, folder)
    raw = GPT2ReproForCausalLM(cfg.model_config())
    model, *optimizers = acc.prepare(raw, *build_optimizers(raw, cfg, acc.device))
    for p in raw.parameters():  # one real step: AdamW's moments exist (their values do not change the cost)
        p.grad = torch.randn_like(p) * 1e-3
    for opt in optimizers:
        opt.step()
        opt.zero_grad()
    source = TokenShardLoader(str(data), split="train", batch_size=1, seq_len=64, rank=0, world_size=1, seed=0)
    checkpoints = Checkpoints(cfg, folder, acc, model, raw, source, get_gpt2_encoding())
    n_params = sum(p.numel() for p in raw.parameters())

    timers = Timers()
    timers.wrap(models_mod, "nonfinite_parameters", "NaN/inf check of the weights")
    timers.wrap(PreTrainedModel, "save_pretrained",
                lambda a: "save_pretrained: ours (safetensors, config, code)" if isinstance(a[0], GPT2ReproForCausalLM)
                else "stock export: save_pretrained of GPT2LMHeadModel")  # fmt: skip
    timers.wrap(PreTrainedTokenizerBase, "save_pretrained", "tokenizer save_pretrained")
    timers.wrap(GPT2ReproForCausalLM, "from_pretrained", "stock export: re-read the folder (from_pretrained)")
    timers.wrap(GPT2ReproForCausalLM, "to_official_gpt2", "stock export: convert to GPT2LMHeadModel")
    timers.wrap(type(acc), "save_state", "accelerate save_state (optimizer, RNG)")
    timers.wrap(ckpt_mod, "commit_checkpoint", "commit: fsync every file, rename, rotate")
    timers.wrap(ckpt_mod, "link_tree", "export/ and export-gpt2/ hard links")
    totals, spent, sizes = {"full": [], "quick": []}, {"full": {}, "quick": {}}, {}
    try:
        checkpoints.save(0, 0, LastEval())  # first call: imports and lazy set-up, not counted
        for i in range(repeats):
            for kind in ("full", "quick"):  # alternating: a busy machine weighs on both alike
                timers.spent.clear()
                t0 = time.perf_counter()
                final = checkpoints.save(2 * i + (kind == "quick") + 1, 64, LastEval(), quick=kind == "quick")
                totals[kind].append(time.perf_counter() - t0)
                for name, t in timers.spent.items():
                    spent[kind][name] = spent[kind].get(name, 0.0) + t / repeats
                sizes[kind] = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    finally:
        timers.undo()
    print(f"\n== {size}: {n_params / 1e6:.1f}M parameters")
    for kind in ("full", "quick"):
        print(
            f"   {kind}: {sizes[kind] / 1e9:.3f} GB, Checkpoints.save {', '.join(f'{t:.2f}' for t in totals[kind])} s"
        )
        for name, t in sorted(spent[kind].items(), key=lambda kv: -kv[1]):
            print(f"      {t:7.2f} s  {name}")
    full, quick = (sorted(totals[k])[len(totals[k]) // 2] for k in ("full", "quick"))
    ratio = sizes["full"] / sizes["quick"]
    print(f"   median full / quick: {full:.2f} / {quick:.2f} s = {full / quick:.2f}x; bytes {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        for mib in (256, 2048):
            print(f"disk: dd {mib} MiB conv=fsync -> {disk_speed(tmp, mib):.0f} MB/s ({tmp})")
        from gpt2_repro.data.shards import write_shard
        from synthetic import learnable_tokens

        data = tmp / "data"
        data.mkdir()
        tokens = learnable_tokens(40000)
        write_shard(data / "b_val_000000.bin", tokens[:20000])
        write_shard(data / "b_train_000001.bin", tokens[20000:])
        for size in args.sizes:
            with contextlib.redirect_stderr(sys.stdout):
                measure(size, tmp, data, args.repeats)


if __name__ == "__main__":
    main()
