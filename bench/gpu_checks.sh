#!/usr/bin/env bash
# The GPU path once, end to end, on one machine: what a user's first GPU run executes, timed and logged.
#
#   bash bench/gpu_checks.sh DATA_DIR HELLASWAG_JSONL LOG_DIR [--tiny]
#
# DATA_DIR: token shards from data_prep.py (any text: the speed does not depend on it); HELLASWAG_JSONL: a
# HellaSwag-format file (the real hellaswag_val.jsonl, or a synthetic one when only the code path matters).
# Steps, each under its own time limit, each logged to LOG_DIR/<step>.log, a one-line result per step in
# LOG_DIR/summary.txt:
#   1. bench:  bench/gpu_bench.py on the 124M config (bf16, torch.compile, micro-batch 64, T=1024), with a
#              torch.profiler table of one step;
#   2. train:  train.py on the 124M config (micro-batch 64, 65,536 tokens per step) with periodic validation,
#              HellaSwag, samples and checkpoints; then `--resume latest` to a later step;
#   3. eval:   evaluate_gpt2.py on the export, compiled;
#   4. tests:  the gpu-marked tests;
#   5. fsdp:   README's FSDP variant of accelerate_config.yaml, one process: a few steps with the periodic
#              evaluation on (validation loss, HellaSwag, samples, on the sharded model), a checkpoint,
#              `--resume latest`, the gathered export loading with the Auto classes, and evaluate_gpt2.py on that
#              export (one process, the same weights) giving the last evaluation's validation loss;
#   6. fsdp_muon: the same with --optimizer muon (gpt2_repro/training/muon.py on FSDP2's DTensors, its state in
#              accelerate's sharded checkpoint), a checkpoint and `--resume latest`.
# --tiny runs the same steps with a tiny model on CPU (a check of this script, not of a GPU).
set -u
DATA=$(realpath "$1")
HELLASWAG=$(realpath "$2")
LOGS=$(realpath -m "$3")
TINY=${4:-}
cd "$(dirname "$0")/.."
mkdir -p "$LOGS"
WORK=$(mktemp -d)
: > "$LOGS/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run it, keep its log, note rc and wall time
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name: $*" >> "$LOGS/$name.log"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >> "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s: $*" | tee -a "$LOGS/summary.txt"
    return $rc
}

if [ -n "$TINY" ]; then
    MODEL=(--n_layer 2 --n_head 4 --n_embd 64 --n_positions 128 --seq_len 128)
    BATCH=(--micro_batch_size 4 --total_batch_tokens 512)
    BENCH=(--tiny --steps 3 --warmup 2)
    VAL=2048
    STEPS=(20 30 10)  # first run, after the resume, evaluation/checkpoint interval
else
    MODEL=()
    BATCH=(--micro_batch_size 64 --total_batch_tokens 65536)
    BENCH=(--micro_batch_size 64 --steps 30 --warmup 10)
    VAL=31744  # 31 windows of 1024 + 1 fit a 32,768-token val shard
    STEPS=(100 150 50)
fi

# 1. Throughput of train.py's step.
step bench 240 python bench/gpu_bench.py "${BENCH[@]}" --profile "$LOGS/profile.txt"

# 2. A short real run, then a resume that carries it further.
RUN="$WORK/run"
COMMON=(--config configs/gpt2_124m.yaml "${MODEL[@]}" "${BATCH[@]}" --data_dir "$DATA"
    --output_dir "$RUN" --warmup_steps 20 --eval_every "${STEPS[2]}" --val_tokens "$VAL"
    --eval_batch_size 16 --hellaswag_file "$HELLASWAG" --hellaswag_limit 64 --num_samples 2
    --sample_tokens 24 --checkpoint_every "${STEPS[0]}" --keep_last 2)
step train 240 python train.py "${COMMON[@]}" --max_steps "${STEPS[0]}" &&
    step train 180 python train.py "${COMMON[@]}" --max_steps "${STEPS[1]}" --resume latest
cp "$RUN/metrics.jsonl" "$LOGS/metrics.jsonl" 2>/dev/null

# 3. Evaluation of the export, compiled.
step eval 150 python evaluate_gpt2.py --model "$RUN/export" --data_dir "$DATA" --val_tokens "$VAL" \
    --hellaswag_file "$HELLASWAG" --compile true --output "$WORK/eval.json" --log_dir "$RUN"

# 4. The gpu-marked tests (skipped, not failed, without a GPU).
step tests 240 python -m pytest -q -m gpu -p no:cacheprovider tests

# 5. FSDP (README's variant of accelerate_config.yaml), one process.
FSDP_CONFIG="$WORK/accelerate_fsdp.yaml"
sed -e 's/^distributed_type: MULTI_GPU.*/distributed_type: FSDP/' -e 's/^num_processes: .*/num_processes: 1/' \
    accelerate_config.yaml > "$FSDP_CONFIG"
cat >> "$FSDP_CONFIG" <<'YAML'
fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, fsdp_transformer_layer_cls_to_wrap: GPT2ReproBlock, fsdp_state_dict_type: SHARDED_STATE_DICT}
YAML
FSDP_RUN="$WORK/fsdp"
FSDP_ARGS=(--config configs/gpt2_124m.yaml "${MODEL[@]}" --micro_batch_size 8 --total_batch_tokens 8192
    --data_dir "$DATA" --output_dir "$FSDP_RUN" --warmup_steps 2 --eval_every 3 --val_tokens "$VAL"
    --eval_batch_size 8 --hellaswag_file "$HELLASWAG" --hellaswag_limit 32 --num_samples 2 --sample_tokens 16
    --checkpoint_every 3 --compile false)
[ -n "$TINY" ] && FSDP_ARGS+=(--total_batch_tokens 1024 --micro_batch_size 8)
step fsdp 150 accelerate launch --config_file "$FSDP_CONFIG" train.py "${FSDP_ARGS[@]}" --max_steps 3 &&
    step fsdp 120 accelerate launch --config_file "$FSDP_CONFIG" train.py "${FSDP_ARGS[@]}" \
        --max_steps 6 --resume latest &&
    step fsdp 60 python -c "
import sys, torch
from transformers import AutoModelForCausalLM
for folder in ('$FSDP_RUN/export', '$FSDP_RUN/export-gpt2'):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    logits = model(torch.tensor([[464, 3290, 318]])).logits
    assert torch.isfinite(logits[..., :50257]).all(), folder
    print(folder, type(model).__name__, 'loads; finite logits')
" &&
    step fsdp 150 python evaluate_gpt2.py --model "$FSDP_RUN/export" --data_dir "$DATA" --val_tokens "$VAL" \
        --hellaswag_file "$HELLASWAG" --limit 32 --batch_size 8 --dtype bfloat16 --output "$WORK/fsdp_eval.json" &&
    step fsdp 30 python -c "
import json
rows = [json.loads(line) for line in open('$FSDP_RUN/metrics.jsonl')]
evals = {r['step']: r for r in rows if 'val_loss' in r}
assert sorted(evals) == [3, 6] and all('hellaswag_acc_norm' in r for r in evals.values()), evals
alone = json.load(open('$WORK/fsdp_eval.json'))['val_loss']
print('FSDP evaluation at step 6:', evals[6]['val_loss'], '; evaluate_gpt2.py on the export, one process:', alone)
assert abs(evals[6]['val_loss'] - alone) < 0.01 * alone  # bf16 both ways, other kernels
sample = '--- sample 1 at step %d:' % 6  # not spelled out: this command is written to the log it reads
assert sample in open('$LOGS/fsdp.log').read(), 'no sample logged under FSDP'
"
# 6. Muon under FSDP, one process: the step on DTensors, its state through the sharded checkpoint and a resume.
MUON_ARGS=("${FSDP_ARGS[@]}" --optimizer muon --output_dir "$WORK/fsdp_muon")
step fsdp_muon 150 accelerate launch --config_file "$FSDP_CONFIG" train.py "${MUON_ARGS[@]}" --max_steps 3 &&
    step fsdp_muon 120 accelerate launch --config_file "$FSDP_CONFIG" train.py "${MUON_ARGS[@]}" \
        --max_steps 6 --resume latest
cat "$LOGS/summary.txt"
rm -rf "$WORK"
