#!/usr/bin/env bash
# STARE, background / vessel (docs/datasets.md, "CHASE-DB1 and STARE").
#
# Where: https://cecas.clemson.edu/~ahoover/stare/probing/index.html (segprompt never downloads).
# Archives (their members are gzipped .ppm.gz files, read as they are):
#   stare-images.tar   20 images im????.ppm.gz
#   labels-ah.tar      hand labels of A. Hoover, im????.ah.ppm.gz (used by default)
#   labels-vk.tar      hand labels of V. Kouznetsova, im????.vk.ppm.gz (--annotator vk)
# Checksums: none embedded; meta.json records the size and SHA-256 of the archives converted.
#
# Result: data/stare with train 10 / val 10 PNG images (sorted names), vessel labels {0, 1}.
set -euo pipefail
SRC=${SRC:-data/raw/stare}
segprompt prepare stare --src "$SRC" --out data/stare
segprompt prepare stare --check --out data/stare
