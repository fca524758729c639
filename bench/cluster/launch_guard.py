"""Proposed guard (for gpt2_repro, at the lead's choice of module): refuse a launch whose processes never formed
one process group. `launch_problem` is a pure function of the environment and of what accelerate's Accelerator
says; bench/cluster/launch_matrix.py checks it against every launch it must tell apart.

What a launcher leaves in each process's environment (measured with bench/cluster/probe_env.py, accelerate 1.16,
torch 2.13, CPU machine):

- torchrun (and `accelerate launch` with --multi_gpu / a MULTI_GPU or FSDP config, which runs torchrun) sets
  WORLD_SIZE, RANK, LOCAL_WORLD_SIZE, TORCHELASTIC_RUN_ID. Without CUDA and without ACCELERATE_USE_CPU=true,
  accelerate ignores them: DistributedType.NO and 1 process in each of the WORLD_SIZE processes.
- `accelerate launch --cpu` (its "simple" launcher) starts exactly one process, whatever --num_processes or
  --num_machines say (several CPU processes need --mpirun_hostfile). It always sets ACCELERATE_USE_CPU and
  ACCELERATE_MIXED_PRECISION, and MASTER_ADDR / MASTER_PORT only when it was asked for more than one process or
  machine; it sets no RANK or WORLD_SIZE.
- mpirun (`accelerate launch --cpu --mpirun_hostfile`) sets PMI_SIZE or OMPI_COMM_WORLD_SIZE or MV2_COMM_WORLD_SIZE,
  which accelerate reads (with WORLD_SIZE) as the number of processes on CPU.
- `srun -n N python train.py` starts N processes with SLURM_STEP_NUM_TASKS=N and nothing accelerate reads.
"""

from __future__ import annotations

# accelerate's own list (state.py, PartialState._prepare_backend), in its order: the first one set is the count.
WORLD_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")

HOW = (
    "on CPU start several processes with `ACCELERATE_USE_CPU=true torchrun --nproc_per_node N train.py ...` (several "
    "machines: add --nnodes, --node_rank, --master_addr); on GPU machines make sure CUDA is visible to every process"
)


def launch_problem(env, num_processes: int) -> str | None:
    """Why this launch would train as separate runs, or None when it is fine.

    `env`: the process's environment; `num_processes`: accelerator.num_processes (or PartialState().num_processes).
    Fires when a launcher started more (or other) processes than accelerate joined into one group, so each process
    would train the whole run on its own into the same folder.
    """
    for name in WORLD_SIZE_VARS:
        if env.get(name):
            launched = int(env[name])
            if launched != num_processes:
                return (
                    f"the launcher started {launched} processes ({name}={launched}) but accelerate joined "
                    f"{num_processes} (no process group: CUDA unavailable and ACCELERATE_USE_CPU not set?), so each "
                    f"would train the same run on its own: {HOW}"
                )
            return None
    if num_processes != 1:
        return None
    if env.get("MASTER_ADDR") and "ACCELERATE_MIXED_PRECISION" in env:
        # `accelerate launch --cpu` asked for several processes or machines: it started this one alone.
        return (
            "`accelerate launch --cpu` with --num_processes > 1 or --num_machines > 1 starts one process per machine "
            f"that never joins the others (it needs --mpirun_hostfile for several CPU processes): {HOW}"
        )
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if tasks and int(tasks) > 1:
        return (
            f"srun started {tasks} copies of train.py (SLURM_STEP_NUM_TASKS={tasks}), which do not form a process "
            "group by themselves: run one launcher per node (`srun --ntasks-per-node=1 torchrun ...` or "
            "`accelerate launch`), or `srun -n 1`"
        )
    return None
