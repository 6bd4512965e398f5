#!/bin/bash
# Convert a data set with a SLURM job array, one part per array task, then merge (from the repository root):
#   job=$(sbatch --parsable --array=0-15 slurm/make_shards.sh VITON-HD/ --out /shared/shards --image-size 1024x768)
#   sbatch --dependency=afterok:$job --wrap "python tools/make_shards.py --merge --out /shared/shards"
# The arguments are tools/make_shards.py's; the part is the array index (0-based) and the number of parts the
# array's size: --array=0-15 (or 0-15%4 to run 4 at a time). A failed part re-run alone redoes only itself:
#   PARTS=16 sbatch --array=7 slurm/make_shards.sh VITON-HD/ --out /shared/shards --image-size 1024x768
# The output folder must be on a filesystem every node sees.
#SBATCH --job-name=tryon-shards
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=4:00:00
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail
cd "${TRYON_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
: "${SLURM_ARRAY_TASK_ID:?submit as an array job: sbatch --array=0-N slurm/make_shards.sh ...}"
PARTS=${PARTS:-$SLURM_ARRAY_TASK_COUNT}
exec "${PYTHON:-python}" tools/make_shards.py "$@" --part "$SLURM_ARRAY_TASK_ID" --parts "$PARTS" \
    --workers "${SLURM_CPUS_PER_TASK:-1}"
