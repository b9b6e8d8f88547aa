"""Training-step time, peak memory and per-task checkpoint size of every tuning method, side by side.

Same model (ResNetV1c-101-d8 + PSP head + FCN auxiliary head, K=150, random weights) and the same
input for every method. Each method is measured in a fresh subprocess, so peak memory is its own:
``torch.cuda.max_memory_allocated`` on a GPU, peak resident memory (ru_maxrss) above the built
model on a CPU. Ratios are against full tuning, measured in the same run.

    python benchmarks/tuning_methods.py [--size 256] [--batch 2] [--steps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "full": [], "scratch": [], "head": [], "bias": [], "side": [], "adapter": [], "lora": [],
    "spm": ["tuning.stages=[1,2,3,4,5]", "tuning.recurrent=1"],
}


def measure(method: str, size: int, batch: int, steps: int, device: str) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from segprompt.build import apply_tuning, build_segmentor
    from segprompt.config import OptimizerConfig, load_recipe
    from segprompt.data.meta import DatasetMeta
    from segprompt.runs.checkpoint import changed_state_dict
    from segprompt.training.optim import build_optimizer
    from segprompt.tuning import TuningContext

    torch.manual_seed(0)
    cfg = load_recipe(REPO / "recipes/spm/ade20k_r101_full.yaml", [f"tuning.name={method}", *METHODS[method]])
    meta = DatasetMeta("bench", [f"c{i}" for i in range(150)], [[0, 0, 0]] * 150)
    model = build_segmentor(cfg, meta, load_pretrained=False)
    apply_tuning(model, cfg, TuningContext(150))
    model.to(device).train()
    opt = build_optimizer(model, OptimizerConfig(lr=0.01))
    img = torch.randn(batch, 3, size, size, device=device)
    label = torch.randint(0, 150, (batch, size, size), device=device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sum(model(img, label).values()).backward()
        opt.step()

    step()  # warm-up (allocations, optimizer state)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # KiB -> MiB
    buf = io.BytesIO()
    torch.save(changed_state_dict(model), buf)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "step_s": seconds, "peak_mib": peak, "ckpt_mib": buf.tell() / 2**20,
            "trainable": trainable}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.size, a.batch, a.steps, a.device)))
        return
    rows = []
    for m in a.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", m, "--size", str(a.size), "--batch", str(a.batch),
                              "--steps", str(a.steps), "--device", a.device], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {m}", file=sys.stderr)
    full = next((r for r in rows if r["method"] == "full"), rows[0])
    print(f"ResNetV1c-101-d8 + PSP, K=150, batch {a.batch} x {a.size}x{a.size}, {a.device}, "
          f"mean of {a.steps} steps after 1 warm-up")
    print(f"{'method':10s} {'trainable':>12s} {'step (s)':>9s} {'x full':>7s} {'peak MiB':>9s} {'x full':>7s} "
          f"{'ckpt MiB':>9s} {'x full':>7s}")
    for r in rows:
        print(f"{r['method']:10s} {r['trainable']:12,d} {r['step_s']:9.3f} {r['step_s'] / full['step_s']:7.2f} "
              f"{r['peak_mib']:9.0f} {r['peak_mib'] / max(full['peak_mib'], 1e-9):7.2f} "
              f"{r['ckpt_mib']:9.1f} {r['ckpt_mib'] / full['ckpt_mib']:7.3f}")


if __name__ == "__main__":
    main()
