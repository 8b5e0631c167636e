#!/bin/bash
# SLURM template: train.sh on several GPUs of one node or on several nodes (one process per GPU, srun).
#
#   sbatch --gres=gpu:4 --ntasks-per-node=4 train_multigpu.sh              # one node, 4 GPUs
#   sbatch --nodes=2 --gres=gpu:4 --ntasks-per-node=4 train_multigpu.sh    # two nodes, 8 GPUs
#
# srun starts one process per GPU (SLURM_PROCID / SLURM_LOCALID give rank and GPU); --batch-size is the global
# batch, shared equally (it must be a multiple of the process count). Preemption as in train.sh: SIGUSR1 reaches
# every process, all stop after the same step, rank 0 writes latest.pth, all exit 3, the job is requeued.
#
# METHOD=finetune|ZSCL|lwf|lwf-vr|icarl|ast|joint (the methods that run on several processes; README: Several GPUs
# or nodes); the method's own flags go after the script, e.g. the paper's full ZSCL:
#   METHOD=ZSCL sbatch --gres=gpu:4 --ntasks-per-node=4 train_multigpu.sh --ref-dataset ImageNet --we --l2 1
#SBATCH --job-name=mtil-ddp
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --mem=192G
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

PYTHON=${PYTHON:-.venv/bin/python}
METHOD=${METHOD:-finetune}
ORDER=${ORDER:-MTIL-I}
SAVE=${SAVE:-ckpt/${METHOD}_${ORDER}}
# The rendezvous: the first node of the allocation, a port derived from the job id.
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

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
    --device cuda \
    --save "$SAVE" \
    "$@"
status=$?

if [ "$status" -eq 3 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "preempted: checkpoint saved in $SAVE; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
