#!/usr/bin/env bash
# The one GPU check (docs/gpu.md): the CUDA tests, batch-1 FPS of STDC1/STDC2 Cityscapes (baseline
# and text-guided, deployed) per precision / layout / compile setting, the text/baseline FPS ratio,
# the TensorRT path where onnxruntime has it, and every tuning method's training step on
# ResNetV1c-101-d8 + PSP at 512x512, batch 2. One PASS / FAIL / SKIP line per item, then a summary;
# every item's full output is in $OUT/<item>.log. Sized to end in about 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                 # PYTHON=python3 (the device image's), OUT=results/gpu_check
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#   DEVICE=cpu SIZE=64x128 TUNING_SIZE=64 SECONDS_PER=0.2 bash benchmarks/gpu_check.sh   # the script itself, on a CPU
#
# Without a CUDA device it says so and exits 0: there is nothing to check (CI never needs a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-results/gpu_check}
SECONDS_PER=${SECONDS_PER:-2}  # timed seconds per bench model (the paper's protocol uses about 3)
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script on small sizes, not a measurement
SIZE=${SIZE:-512x1024}
TUNING_SIZE=${TUNING_SIZE:-512}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
summary=()

item() {  # item NAME COMMAND...: run it, log it, one status line
    local name=$1 start=$SECONDS status
    shift
    if "$@" >"$OUT/$name.log" 2>&1; then status=PASS; else status=FAIL; fi
    echo "$status $name ($((SECONDS - start)) s; $OUT/$name.log)"
    summary+=("$status $name")
}

skip() {
    echo "SKIP $1: $2"
    summary+=("SKIP $1")
}

if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY; nothing to check on a GPU"
    echo "SKIP all: no CUDA device"
    exit 0
fi
if ! "$PY" -c 'import segprompt.cli' 2>"$OUT/import.log"; then
    echo "FAIL import: segprompt does not import with $PY ($(tail -n 1 "$OUT/import.log")); a missing package can travel as a wheel (docs/gpu.md)"
    exit 1
fi
"$PY" - "$DEVICE" <<'EOF' | tee "$OUT/device.txt"
import platform, sys, torch
if sys.argv[1] == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print(f"device: cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}: a dry run, not a measurement")
EOF

# 1. the CUDA tests (AMP bf16 / fp16 + scaler, fp16 overflow, pinned memory, resume, eval vs CPU)
item cuda-tests env SEGPROMPT_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
# DDP needs two GPUs for NCCL; one GPU runs the single-process CUDA path above and the gloo tests on CPU
skip ddp-nccl "2 processes need 2 GPUs under NCCL: torchrun --nproc_per_node=2 -m segprompt train smoke --set runtime.device=cuda (docs/gpu.md)"

# 2. batch-1 FPS at 512x1024: one JSON per setting
bench() {  # bench NAME RECIPE [ARGS...]
    local name=$1 recipe=$2
    shift 2
    item "bench-$name" "$PY" -m segprompt bench "$recipe" --device "$DEVICE" --size "$SIZE" --seconds "$SECONDS_PER" \
        --json --out "$OUT/bench-$name.json" --force "$@"
}
BASE=recipes/stdc/cityscapes_stdc1_baseline.yaml
TEXT=recipes/stdc/cityscapes_stdc1_stage2.yaml
for dt in fp32 bf16 fp16; do
    bench "stdc1-$dt" "$BASE" --dtype "$dt"
done
bench stdc1-fp16-cl "$BASE" --dtype fp16 --channels-last
bench stdc1-fp16-cudagraphs "$BASE" --dtype fp16 --compile-mode reduce-overhead
bench stdc2-fp32 "$BASE" --set model.backbone.variant=stdc2
bench stdc2-fp16-cudagraphs "$BASE" --dtype fp16 --compile-mode reduce-overhead --set model.backbone.variant=stdc2
# the text-guided model (deployed: embeddings baked in) against the baseline, alternating, one run each setting
bench text-vs-base-fp32 "$TEXT" --vs "$BASE"
bench text-vs-base-fp16-cudagraphs "$TEXT" --vs "$BASE" --dtype fp16 --compile-mode reduce-overhead

# 3. TensorRT through onnxruntime, where this onnxruntime has the provider
if [ "$DEVICE" = cuda ] && "$PY" -c 'import sys, onnxruntime as o; sys.exit(0 if "TensorrtExecutionProvider" in o.get_available_providers() else 1)' 2>/dev/null; then
    item export-stdc1 "$PY" -m segprompt export "$BASE" --size "$SIZE" --out "$OUT/stdc1.onnx" --force
    item bench-stdc1-tensorrt "$PY" -m segprompt bench "$OUT/stdc1.onnx" --device cuda --provider tensorrt \
        --seconds "$SECONDS_PER" --json --out "$OUT/bench-stdc1-tensorrt.json" --force
else
    skip tensorrt "this onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu with TensorRT; docs/deploy.md)"
fi

# 4. training step time and peak memory of every tuning method, ratios against full tuning
item tuning-methods "$PY" benchmarks/tuning_methods.py --device "$DEVICE" --size "$TUNING_SIZE" --batch 2

# the numbers, read back from the JSON files
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for f in sorted(out.glob("bench-*.json")):
    r = json.loads(f.read_text())
    setting = f"{r['dtype']}{' channels-last' if r['channels_last'] else ''}" + (
        f" compile({r.get('compile_mode', 'default')})" if r["compile"] else "")
    extra = f"  ratio vs {Path(r['vs']['recipe']).stem}: {r['fps_ratio']:.3f}" if "vs" in r else ""
    rows.append((r["fps"], f"{f.stem[6:]:<32} {setting:<32} {r['fps']:9.1f} FPS{extra}"))
print("setting                          precision / compile                    FPS")
for _, line in rows:
    print(line)
if rows:
    best = max(rows)
    print(f"best: {best[1].split()[0]} at {best[0]:.1f} FPS = {best[0] / 1500:.2f} x the 1500 FPS target")
EOF
echo "gpu_check summary: ${#summary[@]} items"
printf '  %s\n' "${summary[@]}"
! printf '%s\n' "${summary[@]}" | grep -q '^FAIL'
