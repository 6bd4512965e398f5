#!/bin/bash
# Train UNet 3, the 256 -> 1024 px Efficient-UNet, on 256 px crops: sbatch slurm/train_sr1024.sh   (from the
# repository root). Its config defines the whole cascade (configs/cascade1024.yaml; cascade1024x768.yaml for
# VITON-HD / DressCode's portrait size); its shards are written at 1024 px (tools/make_shards.py --image-size
# 1024). Edit the #SBATCH lines for your cluster; the settings of slurm/common.sh can be overridden from the
# environment, e.g. CONFIG=configs/cascade1024x768.yaml OUTPUT_DIR=/scratch/run1 sbatch slurm/train_sr1024.sh
#SBATCH --job-name=tryon-sr1024
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
UNET=3
CONFIG=${CONFIG:-configs/cascade1024.yaml}
source "${TRYON_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
