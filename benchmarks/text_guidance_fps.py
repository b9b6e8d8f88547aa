"""What the text guidance costs in speed: STDC1-Seg with the deployed text module (stage 2) against the
plain STDC1-Seg baseline, timed alternately in one run (`segprompt bench RECIPE --vs BASELINE`).

The CLIP-distilled STDC-Seg paper's goal is a text model at >= 0.97x the baseline's FPS; it reports
245.3 / 250.4 = 0.980 on Cityscapes (512x1024) and 196.8 / 197.6 = 0.996 on CamVid (720x960), with
TensorRT FP32 on a GTX 1080Ti (Tables 1-2; ``docs/measurement.md``, "Speed"). This script runs
the same comparison in PyTorch on whatever device is here (random weights, batch 1) and prints
both FPS and the ratio. It is a measurement, not a test: the ratio is printed, never asserted.

    python benchmarks/text_guidance_fps.py [--device auto|cpu|cuda] [--threads N] [--seconds 3]
                                           [--pairs cityscapes,camvid] [--dtype fp32] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = {  # dataset -> (text model, baseline, the paper's FPS of each)
    "cityscapes": ("recipes/stdc/cityscapes_stdc1_stage2.yaml", "recipes/stdc/cityscapes_stdc1_baseline.yaml",
                   245.3, 250.4),
    "camvid": ("recipes/stdc/camvid_stdc1_stage2.yaml", "recipes/stdc/camvid_stdc1_baseline.yaml", 196.8, 197.6),
}
GOAL = 0.97


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model (the paper: about 3)")
    parser.add_argument("--chunks", type=int, default=6, help="alternating timed chunks per model")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pairs", default="cityscapes,camvid", help=f"comma-separated, of {', '.join(PAIRS)}")
    parser.add_argument("--out", type=Path, default=None, help="write every result as JSON here")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from rich.console import Console
    from rich.table import Table

    from segprompt.io import atomic_write_json
    from segprompt.measure.bench import BenchOptions, run_bench

    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(f"--pairs: {unknown} not among {', '.join(PAIRS)}")
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} already exists; choose another file")
    console = Console()
    results = {}
    for name in pairs:
        text, base, _, _ = PAIRS[name]
        opts = BenchOptions(dtype=args.dtype, channels_last=args.channels_last, device=args.device,
                            warmup=args.warmup, seconds=args.seconds, chunks=args.chunks, threads=args.threads)
        console.print(f"{name}: timing {Path(text).stem} against {Path(base).stem} ...")
        results[name] = run_bench(REPO / text, opts, vs=REPO / base)
    first = next(iter(results.values()))
    table = Table(title=f"Text guidance speed cost, batch 1, {args.dtype}, random weights, on {first['device_name']} "
                        f"({first['device']}, {first['threads']} threads, torch {first['torch']})")
    table.caption = ("± is the FPS spread over the timed chunks; paper: TensorRT FP32 on a GTX 1080Ti, "
                     + ", ".join(f"{n} {PAIRS[n][2]} / {PAIRS[n][3]} FPS" for n in results))
    for col in ("dataset", "size", "baseline FPS", "text FPS", "ratio", f">= {GOAL}", "paper"):
        table.add_column(col, justify="left" if col in ("dataset", "size") else "right")
    for name, r in results.items():
        paper_text, paper_base = PAIRS[name][2:]
        h, w = r["size"]
        base_fps, text_fps = (f"{m['fps']:.2f} ± {m['latency_ms_std'] / m['latency_ms'] * m['fps']:.2f}"
                              for m in (r["vs"], r))
        table.add_row(name, f"{h}x{w}", base_fps, text_fps,
                      f"{r['fps_ratio']:.3f}", "yes" if r["fps_ratio"] >= GOAL else "no",
                      f"{paper_text / paper_base:.3f}")
    console.print(table)
    if args.out is not None:
        atomic_write_json(args.out, results)
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
