"""`segprompt demo`: a real miniature of the SPM paper's Table 1 on synthetic data, on a CPU.

1. Prepare two synthetic domains with the same classes: a source (domain shift 0) and a shifted
   target (domain shift 1) with few labelled training images.
2. Pre-train a small ResNet + FCN on the source (``recipes/demo/pretrain_source.yaml``); the
   backbone is cached under ``results/demo/cache/`` by the hash of the resolved recipe.
3. Adapt it to the target with each tuning method (``recipes/demo/adapt_target.yaml``), then
   report the trainable parameters, target mIoU and wall time of each, as a table, a CSV, a
   Markdown file and a plot in the demo's run folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from segprompt.config import dump_recipe, load_recipe
from segprompt.data.synthetic import generate_synthetic
from segprompt.engine.params import breakdown
from segprompt.engine.rundir import CKPT_DIR, LAST
from segprompt.engine.train import train
from segprompt.io import atomic_torch_save, atomic_write_text

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"
# method -> extra overrides for the small model (SPM: narrower than the paper's C = 256)
METHODS: dict[str, list[str]] = {
    "head": [],
    "bias": [],
    "adapter": ["tuning.channels=16", "tuning.groups=4"],
    "spm": ["tuning.stages=[1,2,3,4,5]", "tuning.recurrent=2", "tuning.channels=32", "tuning.prior_resolution=32"],
    "full": [],
}
LABELS = {"head": "Head-Tuning", "bias": "Bias-Tuning", "adapter": "Adapter", "spm": "SPM (ours)",
          "full": "Full-Tuning", "side": "Side-Tuning", "scratch": "Learn-from-Scratch"}


@dataclass
class DemoRow:
    method: str
    trainable: int
    mIoU: float
    seconds: float
    run: str


def prepare_domains(root: Path, seed: int) -> tuple[Path, Path]:
    source, target = root / "source", root / "target"
    generate_synthetic(source, seed=seed, num_classes=6, image_size=(96, 96),
                       counts={"train": 128, "val": 16, "test": 0}, domain_shift=0.0)
    generate_synthetic(target, seed=seed + 1, num_classes=6, image_size=(96, 96),
                       counts={"train": 24, "val": 32, "test": 0}, domain_shift=1.0)
    return source, target


def pretrained_backbone(source: Path, cache_root: Path, overrides: list[str]) -> Path:
    """Pre-train on the source domain once; later demos reuse the cached backbone."""
    over = [f"data.root={source}", *overrides]
    cfg = load_recipe(RECIPES / "pretrain_source.yaml", over)
    key = hashlib.sha256(dump_recipe(cfg).encode()).hexdigest()[:12]
    cache = cache_root / f"source-{key}"
    weights = cache / "backbone.pth"
    if not weights.is_file():
        run = train(RECIPES / "pretrain_source.yaml", over, out=cache / "run", resume="auto")
        state = torch.load(run / CKPT_DIR / LAST, weights_only=True)["model"]
        atomic_torch_save({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, weights)
    return weights


def run_demo(out: Path, methods: list[str], data_root: Path = Path("data/demo"),
             cache_root: Path = Path("results/demo/cache"), seed: int = 0, pretrain_overrides: list[str] = (),
             adapt_overrides: list[str] = ()) -> list[DemoRow]:
    source, target = prepare_domains(data_root, seed)
    weights = pretrained_backbone(source, cache_root, list(pretrain_overrides))
    rows = []
    for method in methods:
        over = [f"data.root={target}", f"model.pretrained={weights}", f"tuning.name={method}",
                *METHODS.get(method, []), *adapt_overrides]
        start = time.perf_counter()
        run = train(RECIPES / "adapt_target.yaml", over, out=out / method)
        seconds = time.perf_counter() - start
        result = json.loads((run / "eval.json").read_text())
        cfg = load_recipe(run / "config.yaml")
        rows.append(DemoRow(method, breakdown(cfg, 6, "all").trainable, result["mIoU"], seconds, str(run)))
    write_report(out, rows)
    return rows


def write_report(out: Path, rows: list[DemoRow]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame([{"method": LABELS.get(r.method, r.method), "trainable_params": r.trainable,
                        "mIoU": round(r.mIoU, 2), "seconds": round(r.seconds, 1)} for r in rows])
    atomic_write_text(out / "demo.csv", df.to_csv(index=False))
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in rec) + " |" for rec in df.itertuples(index=False)]
    atomic_write_text(out / "demo.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(df["trainable_params"], df["mIoU"])
    for _, r in df.iterrows():
        ax.annotate(r["method"], (r["trainable_params"], r["mIoU"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("target mIoU (%)")
    ax.set_title("Synthetic source -> target transfer (segprompt demo)")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=120)
    plt.close(fig)

