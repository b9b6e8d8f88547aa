#!/usr/bin/env bash
# ISPRS Vaihingen, 6 classes incl. clutter (docs/datasets.md, "ISPRS Vaihingen").
#
# Where: https://www.isprs.org/education/benchmarks/UrbanSemLab/2d-sem-label-vaihingen.aspx
#   (ISPRS 2D semantic labeling benchmark; the files are sent on request via the data request form).
# Put these two archives, unrenamed, in $SRC (they are chosen by name; any other zip there, e.g. the
# non-eroded ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip, is never read):
#   ISPRS_semantic_labeling_Vaihingen.zip                               top/top_mosaic_09cm_area<N>.tif (IRRG)
#   ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip  top_mosaic_09cm_area<N>_noBoundary.tif
# Checksums: none embedded; meta.json records the size and SHA-256 of the archives converted.
#
# Result: data/vaihingen with 512x512 tiles, train 344 / val 398 (mmseg's tiling, the SPM paper's
# counts). Labels from the RGB colour table, boundaries 255; channels stay IRRG.
set -euo pipefail
SRC=${SRC:-data/raw/vaihingen}
segprompt prepare vaihingen --src "$SRC" --out data/vaihingen
segprompt prepare vaihingen --check --out data/vaihingen
# tiles with a true 256-pixel stride instead (1046 / 1208):
# segprompt prepare vaihingen --tiling true-stride --src "$SRC" --out data/vaihingen_stride256
