"""What a launcher gives each process: the environment variables that say how many processes were started, and what
accelerate's Accelerator makes of them. One JSON line per process on stdout; writes nothing else.

    accelerate launch --config_file accelerate_config.yaml --num_processes 2 bench/cluster/probe_env.py
    torchrun --standalone --nproc_per_node 2 bench/cluster/probe_env.py

bench/cluster/launch_matrix.py runs it under every launch the multi-process guard must tell apart.
"""

from __future__ import annotations

import json
import os
import sys

PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_", "ROLE_", "MASTER_", "TORCHELASTIC_")
PREFIXES += (
    "ACCELERATE_",
    "FSDP_",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_",
)
PREFIXES += ("SLURM_LOCALID", "PMI_", "OMPI_COMM_WORLD_", "MV2_COMM_WORLD_")


def main() -> None:
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(PREFIXES)}
    from accelerate import Accelerator

    acc = Accelerator()
    state = {
        "distributed_type": str(acc.distributed_type),
        "num_processes": acc.num_processes,
        "process_index": acc.process_index,
        "device": str(acc.device),
    }
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "env": env, "accelerator": state}), flush=True)
    acc.wait_for_everyone()  # a real group: the processes meet here; none: each returns at once
    sys.exit(0)


if __name__ == "__main__":
    main()
