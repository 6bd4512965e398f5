# Shared by train_base.sh and train_sr.sh (sourced, not run). Launches tryon_ds/train.py with one task per
# GPU through srun, and turns SLURM's warning signal into a checkpoint and a requeue.
#
# Settings, each overridable from the environment (sbatch --export=ALL,CONFIG=...):
#   CONFIG          training config                      (default: configs/config.json)
#   DS_CONFIG       DeepSpeed config                     (default: ds_configs/zero2_bf16.json)
#   DATA_DIR        shard folder (sets data_dir)         (default: the config's)
#   OUTPUT_DIR      outputs, checkpoints/ and logs/ go under it (default: the config's folders)
#   EXTRA_ARGS      more arguments for train.py, e.g. "--max_steps 100000 --set data.num_workers=8"
#   PYTHON          the Python to run                    (default: python)
#   TRYON_REPO      the repository                       (default: the folder sbatch was run from)
set -euo pipefail

REPO=${TRYON_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-configs/config.json}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_bf16.json}

# Rendezvous: the first node of the allocation; its SLURM name may not resolve as a host name.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if ! getent hosts "$MASTER_ADDR" >/dev/null 2>&1; then
    echo "note: node name $MASTER_ADDR does not resolve; using 127.0.0.1 (single-host allocation)"
    MASTER_ADDR=127.0.0.1
fi
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # per job, so jobs sharing a node do not collide
if command -v nvidia-smi >/dev/null 2>&1; then
    export NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
fi

args=(--config "$CONFIG" --deepspeed_config "$DS_CONFIG" --train_unet "$STAGE" --resume auto)
[ -n "${DATA_DIR:-}" ] && args+=(--set "data_dir=$DATA_DIR")
if [ -n "${OUTPUT_DIR:-}" ]; then
    args+=(--set "output_dir=$OUTPUT_DIR" --set "checkpoint_dir=$OUTPUT_DIR/checkpoints" --set "log_dir=$OUTPUT_DIR/logs")
fi
# shellcheck disable=SC2206
args+=(${EXTRA_ARGS:-})

echo "=== $(date -Is) job $SLURM_JOB_ID start #${SLURM_RESTART_COUNT:-0} (restart count) on $SLURM_JOB_NODELIST:" \
     "$SLURM_NNODES node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s), master $MASTER_ADDR:$MASTER_PORT, unet$STAGE"

# USR1 (--signal=B:USR1@N before the time limit, or scancel --signal=USR1 --batch): pass it to the tasks,
# which finish their step, save and exit 0; only then requeue, so the save is never cut short.
requeue=0
trap 'echo "=== $(date -Is) USR1: checkpointing, then requeue"; requeue=1; kill -USR1 "$srun_pid" 2>/dev/null || true' USR1
srun --kill-on-bad-exit=1 "$PYTHON" tryon_ds/train.py "${args[@]}" &
srun_pid=$!
while true; do
    set +e
    wait "$srun_pid"
    rc=$?
    set -e
    kill -0 "$srun_pid" 2>/dev/null || break  # wait was only interrupted by the trap: keep waiting
done

if [ "$requeue" = 1 ] && [ "$rc" = 0 ]; then
    echo "=== $(date -Is) job $SLURM_JOB_ID saved; requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "=== $(date -Is) job $SLURM_JOB_ID finished with exit status $rc"
exit "$rc"
