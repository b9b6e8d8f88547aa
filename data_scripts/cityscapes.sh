#!/usr/bin/env bash
# Cityscapes, 19 classes (docs/datasets.md, "Cityscapes").
#
# Where: https://www.cityscapes-dataset.com/downloads/ (free account; segprompt never downloads).
# Put these two official archives, unrenamed and unextracted, in $SRC:
#   leftImg8bit_trainvaltest.zip   about 11 GB    leftImg8bit/{train,val,test}/<city>/<frame>_leftImg8bit.png
#   gtFine_trainvaltest.zip        about 241 MB   gtFine/{train,val,test}/<city>/<frame>_gtFine_labelIds.png
# (An already-extracted folder holding leftImg8bit/ and gtFine/ works too.)
# Checksums: segprompt embeds none for these archives; meta.json records the size and SHA-256 of the
# archives actually converted, to compare between machines.
#
# Result: data/cityscapes with train 2975 / val 500 images (2048x1024), labelIds mapped to the 19
# trainIds through the official lookup table, everything else 255. The test split is left out: its
# gtFine holds no class labels.
set -euo pipefail
SRC=${SRC:-data/raw/cityscapes}
segprompt prepare cityscapes --src "$SRC" --out data/cityscapes
segprompt prepare cityscapes --check --out data/cityscapes
