#!/bin/bash
# ZSCL paper, MTIL table (ViT-B/16), row "ZSCL*" (distillation only: no weight ensembling, no L2), Order I or II.
# Published Transfer / Avg / Last: Order I 62.2 / 72.6 / 84.5; Order II 59.8 / 71.8 / 83.3.
# Teacher = the zero-shot model; reference images = ImageNet train (eval transform); reference sentences =
# Conceptual Captions; image and text distillation losses both on (the default when neither is named), T = 2.
# Data: the eleven MTIL datasets, ImageNet (data/ImageNet/train/<wnid>/) and Conceptual Captions
# (data/conceptual_captions/Validation_GCC-1.1.0-Validation_output.csv); layout: data/README.md.
# CLIP ViT-B/16 weights in clip/.
#
# Usage: scripts/paper/zscl_star.sh [MTIL-I|MTIL-II] [extra mtil flags...]   (recipe and env: common.sh)
PAPER_NAME=zscl_star
METHOD_FLAGS=(--method ZSCL --ref-dataset ImageNet --ref-sentences conceptual_captions)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
