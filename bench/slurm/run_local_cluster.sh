#!/bin/bash
# bench/slurm/train.sbatch under a real Slurm: a one-node cluster on this machine (munged, slurmctld, slurmd, all of
# it in $WORK, nothing of the system's configuration touched), training the tiny test model on CPU with two processes
# (torchrun, ACCELERATE_USE_CPU=true). Not part of the test suite: it needs Slurm and munge installed
# (Debian/Ubuntu: apt-get install slurmctld slurmd slurm-client munge) and root or a user that may run them.
#
#   bash bench/slurm/run_local_cluster.sh           # PYTHON=.venv/bin/python WORK=/tmp/gpt2-slurm by default
#
# 1. Launches: `srun -n 2 python probe_env.py` (two copies of a one-process run: the guard must refuse it) and
#    `srun -n 1 torchrun --nproc_per_node 2` (one group of two), through the trainer's guard (gpt2_repro/base/launch.py).
# 2. The time limit's warning sent by hand (scancel --batch --signal=USR1, what --signal=B:USR1@N sends): the
#    script stops the training, which saves and exits, and requeues the job (Slurm starts a requeued job about two
#    minutes later); it continues with --resume latest to the end.
# 3. A real time limit: --time=3 --signal=B:USR1@120 on a run longer than that: stopped and requeued at every
#    attempt, each continuing where the previous one stopped; then `scancel`, which cancels (no requeue).
# 4. Preemption: `scontrol requeue` while it trains: Slurm sends SIGTERM to every process, waits KillWait (30 s)
#    before SIGKILL, and requeues the job, which resumes.
# The runs of 2 and 4 are compared with an uninterrupted one-process run (fp32 on CPU: to 1e-6).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python}
WORK=${WORK:-/tmp/gpt2-slurm}
CTLD_PORT=${CTLD_PORT:-16817}
SLURMD_PORT=${SLURMD_PORT:-16818}
STEPS=${STEPS:-60}
export SLURM_CONF=$WORK/slurm.conf

for tool in munged slurmctld slurmd sbatch srun scontrol; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found: apt-get install slurmctld slurmd slurm-client munge"; exit 2; }
done

rm -rf "$WORK" && mkdir -p "$WORK"/{spool/ctld,spool/d,log,run,jobs}
node=$(hostname -s)
cat >"$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$WORK/run/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$WORK/spool/ctld
SlurmdSpoolDir=$WORK/spool/d
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ReturnToService=2
KillWait=30
JobRequeue=1
MpiDefault=none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

stop_cluster() {
    for daemon in slurmd slurmctld munged; do
        [ -f "$WORK/run/$daemon.pid" ] && kill "$(cat "$WORK/run/$daemon.pid")" 2>/dev/null
    done
}
trap stop_cluster EXIT
munged --force -S "$WORK/run/munge.socket" --pid-file="$WORK/run/munged.pid" --log-file="$WORK/log/munged.log" \
    --seed-file="$WORK/run/munge.seed" || exit 1
slurmctld -f "$SLURM_CONF" || exit 1
slurmd -f "$SLURM_CONF" || exit 1
for _ in $(seq 30); do sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 1; done
sinfo

cd "$ROOT"
export PYTHONPATH=$ROOT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" - "$WORK/data" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from gpt2_repro.shards import write_shard
from synthetic import learnable_tokens
folder = Path(sys.argv[1]); folder.mkdir()
tokens = learnable_tokens(60000)
write_shard(folder / "t_val_000000.bin", tokens[:4096]); write_shard(folder / "t_train_000001.bin", tokens[4096:])
EOF
TINY=(--config configs/tiny.yaml --n_layer 2 --n_head 4 --n_embd 64 --n_positions 64 --seq_len 32
    --micro_batch_size 4 --total_batch_tokens 256 --warmup_steps 2 --max_lr 1e-2 --min_lr 1e-3 --eval_every 0
    --val_tokens 512 --hellaswag false --num_samples 0 --cpu_threads 1 --log_with none --checkpoint_every 20
    --data_dir "$WORK/data" --max_steps "$STEPS")

echo "== 1. launches under srun"
for launch in "-n 2 $PY bench/cluster/probe_env.py" \
    "-n 1 env ACCELERATE_USE_CPU=true $PY -m torch.distributed.run --standalone --nproc_per_node 2 bench/cluster/probe_env.py"; do
    echo "-- srun $launch"
    srun $launch 2>/dev/null | "$PY" bench/cluster/guard_verdicts.py
done

echo "== reference: one process, $STEPS steps, uninterrupted"
"$PY" train.py "${TINY[@]}" --output_dir "$WORK/reference" >"$WORK/reference.log" 2>&1 || { tail "$WORK/reference.log"; exit 1; }

# sbatch on this CPU node: no GPUs, 2 cores, two CPU processes.
SBATCH=(sbatch --parsable --gpus-per-node=0 --cpus-per-task="$(nproc)" --chdir="$ROOT")
job_state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
restarts() { scontrol show job "$1" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2; }
steps_logged() { [ -f "$1/metrics.jsonl" ] && grep -c '"loss"' "$1/metrics.jsonl" || echo 0; }
wait_done() { # job, run folder, seconds
    local deadline=$((SECONDS + $3))
    while [ $SECONDS -lt $deadline ]; do
        state=$(job_state "$1")
        [ "$state" = COMPLETED ] || [ "$state" = FAILED ] || [ "$state" = CANCELLED ] || [ "$state" = TIMEOUT ] && break
        sleep 5
    done
    echo "   job $1: $(job_state "$1"), restarts $(restarts "$1"), $(steps_logged "$2") steps logged"
}
compare() { # run folder
    "$PY" - "$WORK/reference" "$1" "$STEPS" <<'EOF'
import json, sys
from pathlib import Path
def losses(run):
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
ref, got, steps = losses(sys.argv[1]), losses(sys.argv[2]), int(sys.argv[3])
diff = max((abs(ref[s] - got[s]) for s in ref if s in got), default=None)
attempts = json.loads((Path(sys.argv[2]) / "run_info.json").read_text())["attempts"]
ckpts = sorted(p.name for p in (Path(sys.argv[2]) / "checkpoints").iterdir())
ok = sorted(got) == list(range(1, steps + 1)) and diff is not None and diff <= 1e-6
ok = ok and all(a["start_step"] > 0 for a in attempts[1:])  # every restart resumed a checkpoint
print(f"   {'OK' if ok else 'WRONG'}: {len(got)}/{steps} steps, max |loss - reference| {diff}, attempts start at "
      f"{[a['start_step'] for a in attempts]}, checkpoints {ckpts}")
EOF
}

submit() { # name, sbatch options..., -- train.py options...
    local name=$1; shift
    local opts=() ; while [ "$1" != -- ]; do opts+=("$1"); shift; done; shift
    "${SBATCH[@]}" "${opts[@]}" --output="$WORK/jobs/$name-%j.out" \
        --export=ALL,ACCELERATE_USE_CPU=true,NPROC_PER_NODE=2,PYTHONPATH=$ROOT,TORCHRUN="$PY -m torch.distributed.run",OUTPUT_DIR=$WORK/$name,CONFIG=configs/tiny.yaml \
        bench/slurm/train.sbatch "$@"
}
show_log() { cat "$WORK"/jobs/"$1"-*.out | tr '\r' '\n' | grep -a -E "job [0-9]+ \(restart|received|ended with|requeueing|stopped at step|error:|CANCELLED|DUE TO|srun: (got|forcing)" | sed 's/^/   | /'; }

echo "== 2. the time limit's warning, sent by hand: scancel --batch --signal=USR1 (what --signal=B:USR1@N sends)"
job=$(submit warning --time=30 -- "${TINY[@]:2}")
echo "   submitted job $job"
deadline=$((SECONDS + 600))
while [ "$(steps_logged "$WORK/warning")" -lt 8 ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
scancel --batch --signal=USR1 "$job" && echo "   scancel --batch --signal=USR1 $job at step $(steps_logged "$WORK/warning")"
wait_done "$job" "$WORK/warning" 1500
show_log warning
compare "$WORK/warning"

echo "== 3. a real time limit: --time=3 --signal=B:USR1@120, a run longer than that; scancel after two requeues"
job=$(submit timelimit --time=3 --signal=B:USR1@120 -- "${TINY[@]:2}" --max_steps 100000 --checkpoint_every 0)
echo "   submitted job $job"
deadline=$((SECONDS + 1200))
while [ $SECONDS -lt $deadline ]; do
    [ "$(restarts "$job")" -ge 2 ] && [ "$(job_state "$job")" = RUNNING ] && break
    sleep 5
done
sleep 15 # the third attempt trains a while (its USR1 comes 30-60 s after its start)
scancel "$job" && echo "   scancel $job (restarts $(restarts "$job"), $(steps_logged "$WORK/timelimit") steps logged)"
while [ "$(job_state "$job")" = RUNNING ] || [ "$(job_state "$job")" = COMPLETING ]; do sleep 1; done
sleep 5
echo "   job $job: $(job_state "$job"), restarts $(restarts "$job")"
show_log timelimit
"$PY" - "$WORK/timelimit" <<'EOF2'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
attempts = json.loads((run / "run_info.json").read_text())["attempts"]
steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
ok = steps == list(range(1, len(steps) + 1))
print(f"   {'OK' if ok else 'WRONG'}: attempts start at {[a['start_step'] for a in attempts]}, steps 1..{len(steps)} "
      f"each logged once: {ok}, checkpoints {ckpts}")
EOF2

echo "== 4. preemption: scontrol requeue while training (SIGTERM to every process, SIGKILL after KillWait=30 s)"
job=$(submit preempt --time=30 -- "${TINY[@]:2}")
echo "   submitted job $job"
deadline=$((SECONDS + 600))
while [ "$(steps_logged "$WORK/preempt")" -lt 8 ] && [ $SECONDS -lt $deadline ]; do sleep 1; done
t0=$SECONDS
scontrol requeue "$job" && echo "   scontrol requeue $job at step $(steps_logged "$WORK/preempt")"
while [ "$(job_state "$job")" = RUNNING ] || [ "$(job_state "$job")" = COMPLETING ]; do sleep 1; done
echo "   the job left RUNNING/COMPLETING after $((SECONDS - t0)) s: $(job_state "$job")"
wait_done "$job" "$WORK/preempt" 1500
show_log preempt
compare "$WORK/preempt"
echo "slurmctld log: $WORK/log/slurmctld.log; job outputs: $WORK/jobs/"
