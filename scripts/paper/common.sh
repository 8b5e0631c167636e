# Shared part of the scripts in scripts/paper/ (sourced by them, not run on its own).
#
# The calling script sets PAPER_NAME (checkpoint folder prefix) and METHOD_FLAGS (array), then sources this file
# with its own positional arguments: [MTIL-I|MTIL-II] [extra mtil flags...].
#
# Recipe (ZSCL paper, MTIL, ViT-B/16): 1000 iterations per task, batch 64, AdamW, weight decay 0, label smoothing
# 0.2, 100 warm-up steps then cosine to 0. The per-task learning rates (5e-5 for Aircraft and MNIST, 1e-5 for the
# others) come from mtil/sequences/mtil_order_1.yaml / mtil_order_2.yaml, which --train-dataset MTIL-I / MTIL-II
# read. So no --lr here: a --lr given as an extra flag would replace them for every task (the run says so).
#
# Environment: PYTHON (default .venv/bin/python), DRY_RUN=1 (print the command, run nothing).
# Runs from the repository root; results go to ckpt/paper/<name>_<order>/ (summary.csv holds Transfer/Avg/Last).
# Extra flags come last, so they override the ones above (argparse keeps the last value), e.g. --workers 8,
# --data-location /datasets, or --save elsewhere. Re-running the same command resumes an unfinished run.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

ORDER=MTIL-I
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    ORDER=$1
    shift
fi
case "$ORDER" in
    MTIL-I|MTIL-II) ;;
    *) echo "usage: $0 [MTIL-I|MTIL-II] [extra mtil flags...]  (got order '$ORDER')" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-.venv/bin/python}
cmd=("$PYTHON" -m mtil.main
     --model ViT-B/16
     --train-mode whole
     --train-dataset "$ORDER"
     --iterations 1000
     --batch-size 64
     --ls 0.2
     --warmup-length 100
     --wd 0
     --save "ckpt/paper/${PAPER_NAME}_${ORDER}"
     "${METHOD_FLAGS[@]}"
     "$@")

printf '%q ' "${cmd[@]}"
echo
if [ "${DRY_RUN:-0}" = 1 ]; then
    exit 0
fi
# exec: the Python process replaces this shell, so SLURM's SIGUSR1/SIGTERM reach it directly (it then writes
# latest.pth and exits with code 3; see train.sh and all.sh for the requeue).
exec "${cmd[@]}"
