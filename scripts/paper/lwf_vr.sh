#!/bin/bash
# ZSCL paper, MTIL table (ViT-B/16), row "LwF-VR", Order I or II.
# Published Transfer / Avg / Last: Order I 57.2 / 65.1 / 76.6; Order II 53.1 / 60.6 / 68.3.
# LwF with random-token sentences (--ref-sentences-count, default 5000, of them) instead of class prompts.
# Data: the eleven MTIL datasets under data/ (layout: data/README.md); CLIP ViT-B/16 weights in clip/.
#
# Usage: scripts/paper/lwf_vr.sh [MTIL-I|MTIL-II] [extra mtil flags...]   (recipe and env: common.sh)
PAPER_NAME=lwf_vr
METHOD_FLAGS=(--method lwf-vr)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
