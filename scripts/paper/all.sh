#!/bin/bash
# Every published MTIL row of the ZSCL paper (ViT-B/16): the zero-shot evaluation once, then continual FT, LwF,
# LwF-VR, iCaRL, WiSE-FT, ZSCL* and ZSCL on Order I and Order II (14 training runs of 11 tasks each).
# Data: the eleven MTIL datasets, plus ImageNet and Conceptual Captions for ZSCL* and ZSCL (data/README.md);
# CLIP ViT-B/16 weights in clip/. Results: ckpt/paper/<method>_<order>/summary.csv (see REPRODUCIBILITY.md).
#
#   scripts/paper/all.sh [extra mtil flags...]           runs them one after another on this machine
#   SBATCH=1 scripts/paper/all.sh [extra mtil flags...]  submits one SLURM job per run (sbatch --wrap), with the
#                                                        same preemption handling as train.sh (requeue on exit 3)
# Extra flags go to every run (e.g. --workers 8). Environment:
#   ORDERS    default "MTIL-I MTIL-II"
#   METHODS   default "finetune lwf lwf_vr icarl wise_ft zscl_star zscl" (script names in this folder)
#   ZEROSHOT  default 1: also run zeroshot.sh (once)
#   SBATCH_ARGS  extra sbatch options, appended after the defaults below (later options win), e.g. "--time=48:00:00"
#   PYTHON, DRY_RUN=1 (print the commands only): passed on to the scripts.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/../.."

ORDERS=${ORDERS:-"MTIL-I MTIL-II"}
METHODS=${METHODS:-"finetune lwf lwf_vr icarl wise_ft zscl_star zscl"}

runs=()
[ "${ZEROSHOT:-1}" = 1 ] && runs+=("zeroshot:")
for order in $ORDERS; do
    for method in $METHODS; do
        [ -f "$here/$method.sh" ] || { echo "all.sh: no script scripts/paper/$method.sh" >&2; exit 2; }
        runs+=("$method:$order")
    done
done

if [ "${SBATCH:-0}" = 1 ]; then
    mkdir -p logs
    for run in "${runs[@]}"; do
        method=${run%%:*}
        order=${run#*:}
        script=(scripts/paper/$method.sh)
        [ -n "$order" ] && script+=("$order")
        inner=$(printf '%q ' "${script[@]}" "$@")
        # srun forwards SLURM's SIGUSR1 to the Python process (the script execs it); on exit code 3 (checkpoint
        # written) the job requeues itself and the re-run resumes from latest.pth.
        wrap="srun $inner; s=\$?; if [ \$s -eq 3 ] && [ -n \"\${SLURM_JOB_ID:-}\" ]; then scontrol requeue \$SLURM_JOB_ID; exit 0; fi; exit \$s"
        # shellcheck disable=SC2086  # SBATCH_ARGS is split into options on purpose
        sub=(sbatch --job-name="paper-${method}${order:+-$order}" --output=logs/%x-%j.out --error=logs/%x-%j.err
             --gres=gpu:1 --cpus-per-task=8 --mem=48G --time=24:00:00 --signal=USR1@90 --requeue
             --open-mode=append --export=ALL ${SBATCH_ARGS:-} --wrap "$wrap")
        if [ "${DRY_RUN:-0}" = 1 ]; then
            printf '%q ' "${sub[@]}"
            echo
        else
            "${sub[@]}" || { echo "all.sh: sbatch failed for $run" >&2; exit 1; }
        fi
    done
    exit 0
fi

failed=()
for run in "${runs[@]}"; do
    method=${run%%:*}
    order=${run#*:}
    echo "=== $method ${order:-(all datasets)} ==="
    if [ -n "$order" ]; then
        "$here/$method.sh" "$order" "$@" || failed+=("$method $order")
    else
        "$here/$method.sh" "$@" || failed+=("$method")
    fi
done

if [ "${DRY_RUN:-0}" != 1 ]; then
    echo
    echo "run                       transfer  avg       last"
    for run in "${runs[@]}"; do
        method=${run%%:*}
        order=${run#*:}
        [ -n "$order" ] || continue
        summary=ckpt/paper/${method}_${order}/summary.csv
        if [ -f "$summary" ]; then
            # summary.csv: method,transfer,avg,last,forgetting,bwt,zero_shot
            tail -n +2 "$summary" | awk -F, -v r="${method}_${order}" '{printf "%-25s %-9s %-9s %s\n", r, $2, $3, $4}'
        else
            printf '%-25s (no summary.csv)\n' "${method}_${order}"
        fi
    done
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf 'all.sh: failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
