"""Training-step time of the real-feature demo's methods at output stride 8 and 16, side by side.

The model is the one `segprompt demo --backbone efficientnet_lite0` adapts (timm EfficientNet-Lite0
+ FCN head + auxiliary FCN head, 6 classes; random weights: the time does not depend on them), at
the demo's batch (8) and crop (64 px), on one thread as each of the demo's two workers runs. Rounds
alternate between the strides so both see the same machine conditions; the ratio is OS 8 / OS 16.
docs/demo.md ("Real features") cites it for the choice of output stride 16.

    python benchmarks/demo_output_stride.py [--methods head,lora,spm,full] [--steps 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_step(method: str, stride: int, crop: int, batch: int):
    sys.path.insert(0, str(REPO))
    import torch

    from segprompt.build import apply_tuning, build_segmentor
    from segprompt.config import load_recipe
    from segprompt.data.meta import DatasetMeta
    from segprompt.experiments.demo import BACKBONES, method_recipe
    from segprompt.training.optim import build_optimizer
    from segprompt.tuning import TuningContext

    bb = BACKBONES["efficientnet_lite0"]
    over = [f"model.backbone.output_stride={stride}", "data.num_classes=6"]
    if bb.methods[method] is None:
        over.append(f"tuning.name={method}")
    cfg = load_recipe(method_recipe(bb, method), over)
    meta = DatasetMeta("bench", [f"c{i}" for i in range(6)], [[0, 0, 0]] * 6)
    torch.manual_seed(0)
    model = build_segmentor(cfg, meta, load_pretrained=False)
    apply_tuning(model, cfg, TuningContext(6))
    model.train()
    opt = build_optimizer(model, cfg.optimizer)
    img = torch.randn(batch, 3, crop, crop)
    label = torch.randint(0, 6, (batch, crop, crop))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sum(model(img, label).values()).backward()
        opt.step()

    step()  # warm-up: allocations, optimizer state
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="head,lora,spm,full")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"{'method':<8} {'OS 8 s/step':>12} {'OS 16 s/step':>13} {'OS 8 / OS 16':>13}")
    for method in args.methods.split(","):
        steps = {s: build_step(method, s, args.crop, args.batch) for s in (8, 16)}
        times: dict[int, list[float]] = {8: [], 16: []}
        for _ in range(args.rounds):
            for stride, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[stride].append((time.perf_counter() - start) / args.steps)
        t8, t16 = statistics.median(times[8]), statistics.median(times[16])
        print(f"{method:<8} {t8:>12.3f} {t16:>13.3f} {t8 / t16:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
