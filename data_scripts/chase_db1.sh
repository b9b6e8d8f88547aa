#!/usr/bin/env bash
# CHASE-DB1, background / vessel (docs/datasets.md, "CHASE-DB1 and STARE").
#
# Where: https://blogs.kingston.ac.uk/retinal/chasedb1/ (segprompt never downloads).
# Archive: CHASEDB1.zip, flat: Image_01L.jpg ... Image_14R.jpg (999x960), each with _1stHO.png and
#   _2ndHO.png annotations: 84 files.
# Checksums: none embedded; meta.json records the size and SHA-256 of the archive converted.
#
# Result: data/chase_db1 with train 20 (01L-10R) / val 8 (11L-14R) PNG images, vessel labels {0, 1}
# from the 1stHO annotator (--annotator 2ndHO for the other).
set -euo pipefail
SRC=${SRC:-data/raw/chase_db1}
segprompt prepare chase_db1 --src "$SRC" --out data/chase_db1
segprompt prepare chase_db1 --check --out data/chase_db1
