#!/bin/bash
# Train the 256x256 super-resolution UNet: sbatch slurm/train_sr.sh   (from the repository root)
# Edit the #SBATCH lines for your cluster; the settings of slurm/common.sh can be overridden from the
# environment, e.g. CONFIG=my.yaml DS_CONFIG=ds_configs/zero3_bf16.json OUTPUT_DIR=/scratch/run1 sbatch ...
#SBATCH --job-name=tryon-sr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --partition=gpu
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
UNET=2
source "${TRYON_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
