#!/bin/bash
# ZSCL paper, MTIL table (ViT-B/16), row "Continual FT" (continual fine-tuning), Order I or II.
# Published Transfer / Avg / Last: Order I 44.6 / 55.9 / 77.3; Order II 46.6 / 56.2 / 67.4.
# Data: the eleven MTIL datasets under data/ (layout: data/README.md); CLIP ViT-B/16 weights in clip/.
#
# Usage: scripts/paper/finetune.sh [MTIL-I|MTIL-II] [extra mtil flags...]   (recipe and env: common.sh)
PAPER_NAME=finetune
METHOD_FLAGS=(--method finetune)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
