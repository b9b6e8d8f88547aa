#!/usr/bin/env bash
# ADE20K SceneParsing, 150 classes (docs/datasets.md, "ADE20K").
#
# Where: http://sceneparsing.csail.mit.edu/ — the file is
#   http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip (segprompt never downloads).
# Archive: ADEChallengeData2016.zip -> ADEChallengeData2016/images/{training,validation}/*.jpg,
#   annotations/{training,validation}/*.png, objectInfo150.txt (class names), sceneCategories.txt.
# Checksums: none embedded; meta.json records the size and SHA-256 of the archive converted.
#
# Result: data/ade20k with train 20210 / val 2000; JPEGs copied as they are; the zero label reduced
# once here (0 -> 255, v -> v-1), so training never shifts labels. release_test.zip has no labels.
set -euo pipefail
SRC=${SRC:-data/raw/ade20k}
segprompt prepare ade20k --src "$SRC" --out data/ade20k
segprompt prepare ade20k --check --out data/ade20k
