#!/bin/bash
# SLURM template: a whole continual-learning sequence in one job, preemption-safe.
#
#   sbatch train.sh                      # edit the variables below first
#
# Ninety seconds before the time limit SLURM sends SIGUSR1 to the Python process; mtil then writes
# <save>/latest.pth at the next step boundary and exits with code 3. This script then requeues the job; the
# requeued job re-runs the same command, which resumes exactly where it stopped.
#SBATCH --job-name=mtil
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=48G
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

PYTHON=${PYTHON:-.venv/bin/python}
METHOD=${METHOD:-finetune}
ORDER=${ORDER:-MTIL-I}
SAVE=${SAVE:-ckpt/${METHOD}_${ORDER}}

# srun forwards SLURM's signal to the Python process.
srun "$PYTHON" -m mtil.main \
    --model ViT-B/16 \
    --method "$METHOD" \
    --train-mode whole \
    --train-dataset "$ORDER" \
    --iterations 1000 \
    --batch-size 64 \
    --ls 0.2 \
    --warmup-length 100 \
    --workers 8 \
    --save "$SAVE" \
    "$@"
status=$?

if [ "$status" -eq 3 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "preempted: checkpoint saved in $SAVE; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
