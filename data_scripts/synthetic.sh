#!/usr/bin/env bash
# The embedded synthetic datasets: nothing to download. A source domain and a shifted target domain
# with the same classes, for transfer experiments; add --num-classes/--image-size/--train/... to taste.
set -euo pipefail
segprompt prepare synthetic --out data/synthetic --seed 0
segprompt prepare synthetic --out data/synthetic_target --seed 1 --domain-shift 1.0
