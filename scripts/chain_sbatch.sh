#!/bin/bash
# The one-task-per-job style: one sbatch job per dataset, each starting from the previous job's checkpoint
# (afterok dependencies), all writing into one folder. When the chain has finished:
#
#   python -m mtil.main --summarize ckpt/chain_finetune
#
# builds accuracy_matrix.csv, summary.csv and the heat map from the results the jobs left.
#
# Usage: scripts/chain_sbatch.sh [METHOD] [SAVE] -- extra mtil flags
set -euo pipefail

METHOD=${1:-finetune}
SAVE=${2:-ckpt/chain_${METHOD}}
shift $(( $# >= 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
DATASETS="Aircraft Caltech101 CIFAR100 DTD EuroSAT Flowers Food MNIST OxfordPet StanfordCars SUN397"
EVAL=$(echo "$DATASETS" | tr ' ' ',')
PYTHON=${PYTHON:-.venv/bin/python}

previous_job=""
previous_ckpt=""
for ds in $DATASETS; do
    lr=1e-5
    case "$ds" in Aircraft|MNIST) lr=5e-5 ;; esac
    load=""
    [ -n "$previous_ckpt" ] && load="--load $previous_ckpt"
    dependency=""
    [ -n "$previous_job" ] && dependency="--dependency=afterok:$previous_job"
    previous_job=$(sbatch --parsable $dependency --job-name="mtil-$ds" --gres=gpu:1 --time=4:00:00 \
        --output="logs/%x-%j.out" --wrap \
        "$PYTHON -m mtil.main --model ViT-B/16 --method $METHOD --train-dataset $ds --iterations 1000 \
         --batch-size 64 --lr $lr --ls 0.2 --eval-datasets $EVAL --save $SAVE $load $*")
    previous_ckpt="$SAVE/$ds.pth"
    echo "submitted $ds as job $previous_job"
done
