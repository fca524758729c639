"""What the launcher started, known before accelerate starts: which process of the launch this one is, and whether
the launch can form one run at all.

What launchers leave in each process's environment (accelerate 1.16, torch 2.13; bench/cluster/launch_matrix.py
shows every case):

- torchrun (and `accelerate launch` with --multi_gpu, a MULTI_GPU or an FSDP config, which runs torchrun) sets
  WORLD_SIZE, RANK, LOCAL_WORLD_SIZE. Without CUDA and without ACCELERATE_USE_CPU=true, accelerate ignores them:
  each of the WORLD_SIZE processes is a run of its own (DistributedType.NO, 1 process), all into one folder.
- `accelerate launch --cpu` starts exactly one process, whatever --num_processes or --num_machines say (several
  CPU processes need --mpirun_hostfile). It sets ACCELERATE_MIXED_PRECISION always, MASTER_ADDR only when it was
  asked for more than one process or machine, and no RANK or WORLD_SIZE.
- mpirun sets PMI_SIZE, OMPI_COMM_WORLD_SIZE or MV2_COMM_WORLD_SIZE, which accelerate reads (with WORLD_SIZE) as the
  process count on CPU.
- `srun -n N python train.py` starts N processes with SLURM_STEP_NUM_TASKS=N and nothing accelerate reads.
"""

from __future__ import annotations

import os

# accelerate's own list (PartialState), in its order: the first one set is the number of processes launched.
WORLD_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")

HOW = (
    "on CPU start several processes with `ACCELERATE_USE_CPU=true torchrun --nproc_per_node N train.py ...` (several "
    "machines: add --nnodes, --node_rank and --master_addr) or `accelerate launch --cpu` with one process; on GPU "
    "machines make sure every process sees CUDA (the driver, CUDA_VISIBLE_DEVICES)"
)


def is_main_process(env=os.environ) -> bool:
    """Whether this is the main process of the launch (RANK 0, or no launcher)."""
    return env.get("RANK", "0") == "0" and env.get("SLURM_PROCID", "0") in ("0", "")


def launch_problem(env=os.environ, num_processes: int | None = None) -> str | None:
    """Why this launch would train as several separate runs into one folder, or None when it is one run.

    `num_processes`: the processes accelerate joined (accelerator.num_processes); None before the accelerator
    exists, when only the launches accelerate will count as one process can be told (they set no world size).
    """
    for name in WORLD_SIZE_VARS:
        if env.get(name):
            launched = int(env[name])
            if num_processes is None or launched == num_processes:
                return None
            return (
                f"the launcher started {launched} processes ({name}={launched}) but accelerate joined "
                f"{num_processes} (no process group: CUDA unavailable, or ACCELERATE_USE_CPU not set?), so each "
                f"would train the same run on its own: {HOW}"
            )
    if num_processes not in (None, 1):
        return None
    if env.get("MASTER_ADDR") and "ACCELERATE_MIXED_PRECISION" in env:  # set by `accelerate launch` alone
        return (
            "`accelerate launch --cpu` with --num_processes > 1 or --num_machines > 1 starts one process per machine "
            f"that never joins the others (several CPU processes need --mpirun_hostfile): {HOW}"
        )
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if tasks and int(tasks) > 1:
        return (
            f"srun started {tasks} copies of train.py (SLURM_STEP_NUM_TASKS={tasks}), which do not form a process "
            "group by themselves: run one launcher per node (`srun --ntasks-per-node=1 torchrun ...` or "
            "`accelerate launch`), or `srun -n 1`"
        )
    return None
