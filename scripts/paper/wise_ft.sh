#!/bin/bash
# ZSCL paper, MTIL table (ViT-B/16), row "WiSE-FT", Order I or II.
# Published Transfer / Avg / Last: Order I 52.3 / 60.7 / 77.7; Order II 51.0 / 61.5 / 72.2.
# Continual fine-tuning; after each task weights = 0.8 * trained + 0.2 * zero-shot.
# Data: the eleven MTIL datasets under data/ (layout: data/README.md); CLIP ViT-B/16 weights in clip/.
#
# Reference weights: zero-shot, as methods.md describes the original. Note: in one stored version of the original
# code (Thunderbeee/ZSCL mtil/src/models/finetune.py) the script WiSE_finetune.sh passes --wise_ft_model n, which
# there blends with the *loaded* (task-start) weights, not zero-shot. Which one produced the published row is not
# settled; the other variant: scripts/paper/wise_ft.sh MTIL-I --wise-ref start --save ckpt/paper/wise_ft_start_MTIL-I
#
# Usage: scripts/paper/wise_ft.sh [MTIL-I|MTIL-II] [extra mtil flags...]   (recipe and env: common.sh)
PAPER_NAME=wise_ft
METHOD_FLAGS=(--method finetune --wise-merge --wise-ft-alpha 0.8 --wise-ref zeroshot)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
