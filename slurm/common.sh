# Shared by train_base.sh, train_sr.sh and train_sr1024.sh (sourced, not run). Launches tryon_ds/train.py with
# one task per GPU through srun, and turns SLURM's warning signal into a checkpoint and a requeue.
#
# Settings, each overridable from the environment (sbatch --export=ALL,CONFIG=...):
#   CONFIG          training config                      (default: configs/config.json)
#   DS_CONFIG       DeepSpeed config                     (default: ds_configs/zero2_bf16.json)
#   DATA_DIR        shard folder (sets data_dir)         (default: the config's)
#   OUTPUT_DIR      outputs, checkpoints/ and logs/ go under it (default: the config's folders)
#   EXTRA_ARGS      more arguments for train.py, e.g. "--max_steps 100000 --set logging.wandb=offline"
#   NUM_WORKERS     data-loader workers per task          (default: --cpus-per-task minus 2, at least 1)
#   PYTHON          the Python to run                    (default: python)
#   TRYON_REPO      the repository                       (default: the folder sbatch was run from)
#   TORCHINDUCTOR_CACHE_DIR  torch.compile's cache (a UNet's compile key) (default: $TRYON_REPO/.cache/inductor)
set -euo pipefail

REPO=${TRYON_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-configs/config.json}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_bf16.json}

source "$REPO/slurm/rendezvous.sh"
MASTER_ADDR=$(rendezvous_host) || exit 1
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # per job, so jobs sharing a node do not collide
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from the allocation: pass it on explicitly, or
# every task gets one CPU and the data-loader workers share it.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
NUM_WORKERS=${NUM_WORKERS:-$(( SRUN_CPUS_PER_TASK > 3 ? SRUN_CPUS_PER_TASK - 2 : 1 ))}
# A failed or hung NCCL collective aborts the process (then srun --kill-on-bad-exit ends the job) instead
# of leaving the other ranks waiting.
# torch.compile's kernels on the shared filesystem, not in each node's /tmp: a requeued or later job, and
# every node of this one after the first to finish a graph, loads them instead of compiling from cold.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$REPO/.cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$TORCHINDUCTOR_CACHE_DIR/triton}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1} NCCL_DEBUG=${NCCL_DEBUG:-WARN}

args=(--config "$CONFIG" --deepspeed_config "$DS_CONFIG" --train_unet "$UNET" --resume auto
      --set "data.num_workers=$NUM_WORKERS")
[ -n "${DATA_DIR:-}" ] && args+=(--set "data_dir=$DATA_DIR")
if [ -n "${OUTPUT_DIR:-}" ]; then
    args+=(--set "output_dir=$OUTPUT_DIR" --set "checkpoint_dir=$OUTPUT_DIR/checkpoints" --set "log_dir=$OUTPUT_DIR/logs")
fi
# shellcheck disable=SC2206
args+=(${EXTRA_ARGS:-})

echo "=== $(date -Is) job $SLURM_JOB_ID start #${SLURM_RESTART_COUNT:-0} (restart count) on $SLURM_JOB_NODELIST:" \
     "$SLURM_NNODES node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s) x $SRUN_CPUS_PER_TASK CPU(s), master" \
     "$MASTER_ADDR:$MASTER_PORT, unet$UNET"

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
