"""Read probe_env.py's JSON lines (from any launcher) on stdin and print, per process, the launch variables, what
accelerate made of them and the trainer's guard's verdict (gpt2_repro/base/launch.py).

    srun -n 2 python bench/cluster/probe_env.py | python bench/cluster/guard_verdicts.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]

from gpt2_repro.base.launch import launch_problem  # noqa: E402

SHOWN = ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "WORLD_SIZE", "RANK", "MASTER_ADDR", "ACCELERATE_USE_CPU")


def main() -> None:
    text, dec, i = sys.stdin.read(), json.JSONDecoder(), 0
    while (i := text.find('{"pid"', i)) >= 0:  # lines of several processes may run together
        record, i = dec.raw_decode(text, i)
        env, acc = record["env"], record["accelerator"]
        shown = " ".join(f"{k}={env[k]}" for k in SHOWN if k in env)
        verdict = launch_problem(env, acc["num_processes"])
        print(f"   {shown} -> {acc['distributed_type']}, {acc['num_processes']} processes; guard: "
              f"{'error: ' + verdict if verdict else 'silent'}")  # fmt: skip


if __name__ == "__main__":
    main()
