#!/bin/bash
# ZSCL paper, MTIL table (ViT-B/16), row "ZSCL" (full method), Order I or II.
# Published Transfer / Avg / Last: Order I 68.1 / 75.4 / 83.6; Order II 64.2 / 74.5 / 83.4.
# ZSCL* (see zscl_star.sh) plus weight ensembling every 100 steps (--we --avg-freq 100) and an L2 penalty to
# the task-start weights with weight 1 (--l2 1), as in the original scripts/ZSCL.sh.
# Data: the eleven MTIL datasets, ImageNet (data/ImageNet/train/<wnid>/) and Conceptual Captions
# (data/conceptual_captions/Validation_GCC-1.1.0-Validation_output.csv); layout: data/README.md.
# CLIP ViT-B/16 weights in clip/.
#
# Usage: scripts/paper/zscl.sh [MTIL-I|MTIL-II] [extra mtil flags...]   (recipe and env: common.sh)
PAPER_NAME=zscl
METHOD_FLAGS=(--method ZSCL --ref-dataset ImageNet --ref-sentences conceptual_captions --we --avg-freq 100 --l2 1)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
