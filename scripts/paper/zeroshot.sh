#!/bin/bash
# ZSCL paper, MTIL table (ViT-B/16), row "Zero-shot" and the per-dataset zero-shot top-1 line.
# Published: Aircraft 24.3, Caltech101 88.4, CIFAR100 68.2, DTD 44.6, EuroSAT 54.9, Flowers 71.0, Food 88.5,
# MNIST 59.4, OxfordPet 89.0, StanfordCars 64.7, SUN397 65.2; Transfer / Avg / Last: Order I 69.4 / 65.3 / 65.3,
# Order II 65.4 / 65.3 / 65.3 (Avg = Last = mean of the eleven; Transfer = mean without the order's first dataset).
# No training: evaluates the CLIP ViT-B/16 weights on the eleven test sets. (Every training run in this folder
# also evaluates the zero-shot model first: row 0 of its accuracy_matrix.csv holds the same numbers.)
# Data: the eleven MTIL datasets under data/ (layout: data/README.md); CLIP ViT-B/16 weights in clip/.
#
# Usage: scripts/paper/zeroshot.sh [extra mtil flags...]
# Environment: PYTHON (default .venv/bin/python), DRY_RUN=1 (print the command, run nothing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ $# -gt 0 ] && [[ "$1" == MTIL-I || "$1" == MTIL-II ]]; then
    shift  # accepted for symmetry with the other scripts; the per-dataset numbers do not depend on the order
fi
PYTHON=${PYTHON:-.venv/bin/python}
cmd=("$PYTHON" -m mtil.main
     --model ViT-B/16
     --eval-only
     --eval-datasets Aircraft,Caltech101,CIFAR100,DTD,EuroSAT,Flowers,Food,MNIST,OxfordPet,StanfordCars,SUN397
     --save ckpt/paper/zeroshot
     "$@")
printf '%q ' "${cmd[@]}"
echo
if [ "${DRY_RUN:-0}" = 1 ]; then
    exit 0
fi
exec "${cmd[@]}"
