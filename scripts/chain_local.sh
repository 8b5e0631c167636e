#!/bin/bash
# The seed's shell loop, one process per task (each loads the previous task's checkpoint), then --summarize.
# Works with any datasets; by default the built-in benchmark on the tiny model, so it runs anywhere:
#
#   START=ckpt/toyclip/ToyCaptions.pth scripts/chain_local.sh ckpt/chain_demo
#
# Usage: scripts/chain_local.sh SAVE [extra mtil flags for every task...]
# Environment: DATASETS, MODEL, ITERATIONS, START (weights the first task loads).
set -euo pipefail
SAVE=${1:-ckpt/chain_local}
shift || true
DATASETS=${DATASETS:-"ToyPosition ToyPattern ToyColor"}
MODEL=${MODEL:-tiny-vit}
PYTHON=${PYTHON:-.venv/bin/python}
EVAL=$(echo "$DATASETS" | tr ' ' ',')

previous=${START:-}
for ds in $DATASETS; do
    load=()
    [ -n "$previous" ] && load=(--load "$previous")
    "$PYTHON" -m mtil.main --model "$MODEL" --method finetune --train-dataset "$ds" --iterations "${ITERATIONS:-50}" \
        --batch-size 32 --lr 1e-4 --eval-datasets "$EVAL" --save "$SAVE" "${load[@]}" "$@"
    previous="$SAVE/$ds.pth"
done
"$PYTHON" -m mtil.main --summarize "$SAVE"
