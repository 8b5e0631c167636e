#!/bin/bash
# ZSCL paper, MTIL table (ViT-B/16), row "LwF", Order I or II.
# Published Transfer / Avg / Last: Order I 56.9 / 64.7 / 74.6; Order II 53.2 / 62.2 / 71.9.
# Teacher = the model at the end of the previous task (zero-shot for the first); reference images = the current
# task's training images; sentences = the current task's class prompts.
# Data: the eleven MTIL datasets under data/ (layout: data/README.md); CLIP ViT-B/16 weights in clip/.
#
# Usage: scripts/paper/lwf.sh [MTIL-I|MTIL-II] [extra mtil flags...]   (recipe and env: common.sh)
PAPER_NAME=lwf
METHOD_FLAGS=(--method lwf)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
