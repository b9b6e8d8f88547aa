"""Many tasks on one frozen backbone vs one separately loaded model per task (docs/multitask.md).

It trains 8 small runs (a ResNet-18 backbone, width 64, from one pretrained file; head, adapter,
LoRA, SPM, side and bias tuning on two synthetic datasets of 4 and 6 classes) for a few
iterations and caches them in --work. Then, for N = 1, 2, 4, 8 tasks, it measures

- memory: what loading the N tasks adds to a fresh process, once as one MultiTaskModel
  ("shared") and once as N separately loaded models ("separate"), each in its own process:
  resident memory (/proc/self/statm) on a CPU, allocated CUDA memory on a GPU, and the bytes of
  tensor storage the models hold;
- latency per image, in a third process holding both, timed in alternating rounds: batch 1 with a
  task switch on every image, and one mixed batch of 2 images per task;
- exactness: every task's logits (both ways of calling) equal the separately loaded run's
  (torch.equal).

Ratios are separate / shared, measured side by side in one run. This is a benchmark, not a test.

    python benchmarks/multitask.py [--tasks 1,2,4,8] [--size 96] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKBONE = {"name": "resnet", "depth": 18, "base_channels": 64, "strides": [1, 2, 2, 1], "dilations": [1, 1, 1, 2]}
# (run name, dataset, tuning): 8 tasks, different methods and numbers of classes
RUNS = [
    ("head_k4", "k4", {"name": "head"}),
    ("adapter_k4", "k4", {"name": "adapter", "channels": 32, "groups": 4}),
    ("lora_k4", "k4", {"name": "lora", "rank": 4}),
    ("spm_k4", "k4", {"name": "spm", "channels": 64, "stages": [2, 3, 4]}),
    ("head_k6", "k6", {"name": "head"}),
    ("side_k6", "k6", {"name": "side", "channels": 32, "groups": 4}),
    ("lora_k6", "k6", {"name": "lora", "rank": 8}),
    ("bias_k6", "k6", {"name": "bias"}),
]


def recipe(root: Path, weights: Path, tuning: dict, iters: int) -> dict:
    return {
        "model": {"backbone": BACKBONE, "pretrained": str(weights),
                  "decode_head": {"name": "fcn", "channels": 64, "num_convs": 1, "dropout": 0.1}},
        "tuning": tuning,
        "data": {"root": str(root), "batch_size": 2,
                 "train": {"scale": [96, 96], "ratio_range": [0.75, 1.25], "crop_size": [64, 64]},
                 "test": {"scale": [96, 96]}},
        "optimizer": {"name": "sgd", "lr": 0.02},
        "schedule": {"iters": iters, "warmup_iters": 0},
        "evaluation": {"interval": iters},
        "checkpoint": {"interval": iters},
        "runtime": {"seed": 0, "device": "cpu", "num_workers": 0, "log_interval": iters},
    }


def prepare(work: Path, iters: int) -> list[Path]:
    """The pretrained file, the two datasets and the 8 trained runs (reused when already there)."""
    sys.path.insert(0, str(REPO))
    import torch
    import yaml

    from segprompt.data.synthetic import generate_synthetic
    from segprompt.models import BACKBONES
    from segprompt.training.launch import train

    work.mkdir(parents=True, exist_ok=True)
    weights = work / "backbone.pth"
    if not weights.is_file():
        torch.manual_seed(0)
        spec = dict(BACKBONE)
        bb = BACKBONES[spec.pop("name")](**spec)
        torch.save({"state_dict": bb.state_dict()}, weights)
    for name, k in (("k4", 4), ("k6", 6)):
        if not (work / name / "meta.json").is_file():
            generate_synthetic(work / name, seed=k, num_classes=k, image_size=(96, 96),
                               counts={"train": 8, "val": 2, "test": 1})
    runs = []
    for name, data, tuning in RUNS:
        run = work / "runs" / name
        if not (run / "checkpoints" / "best.pt").is_file():
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe(work / data, weights, tuning, iters)))
            print(f"training {name} ({iters} iterations) ...", file=sys.stderr)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                train(path, out=run)
        runs.append(run)
    return runs


def resident() -> int:
    """This process's resident memory in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load(kind: str, runs: list[Path], device: str):
    """``kind`` = shared: one MultiTaskModel; separate: each run's own model. Returns a function
    ``(images, task names) -> logits`` that runs each image under its task, and the tensor bytes."""
    import torch

    from segprompt.serve.multitask import MultiTaskModel, load_run_model

    if kind == "shared":
        mt = MultiTaskModel.from_runs({r.name: r for r in runs}, device=device)
        return mt, mt.footprint()["total"]
    models = {r.name: load_run_model(r, device=device) for r in runs}

    def run(images, names):  # what a server without sharing does: group by task, one model each
        out = [None] * len(names)
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            for i, y in zip(idx, models[name](images[torch.tensor(idx, device=images.device)])):
                out[i] = y
        return out

    return run, sum(t.untyped_storage().nbytes() for m in models.values() for t in [*m.parameters(), *m.buffers()])


def memory(kind: str, runs: list[Path], device: str) -> dict:
    """Memory added by loading ``kind``'s models, in this fresh process."""
    sys.path.insert(0, str(REPO))
    import torch

    from segprompt.config import load_recipe
    from segprompt.measure.params import build_counted

    for r in runs:  # warm the imports the models need (peft for LoRA) on the meta device: no tensors
        build_counted(load_recipe(r / "config.yaml"), 4)
    gc.collect()
    cuda = device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else resident()
    model, storage = load(kind, runs, device)
    gc.collect()
    loaded = (torch.cuda.memory_allocated() if cuda else resident()) - before
    return {"loaded_mib": loaded / 2**20, "storage_mib": storage / 2**20}


def speed(runs: list[Path], size: int, repeats: int, device: str) -> dict:
    """Per-image latency of both kinds, timed in alternating rounds in one process (so load on the
    machine hits both alike), and whether every task's logits are exactly the separate run's."""
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(1)
    names = [r.name for r in runs]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2 * len(runs), 3, size, size, generator=gen).to(device)
    mixed = [names[i % len(names)] for i in range(len(images))]  # two images per task, interleaved
    kinds = {kind: load(kind, runs, device)[0] for kind in ("shared", "separate")}
    switch = {k: lambda f=f: [f(images[i:i + 1], [n]) for i, n in enumerate(names)] for k, f in kinds.items()}
    batch = {k: lambda f=f: f(images, mixed) for k, f in kinds.items()}
    times: dict[str, list[float]] = {f"{k}_{what}": [] for k in kinds for what in ("switch", "mixed")}
    with torch.no_grad():
        exact = all(torch.equal(a, b) for a, b in zip(batch["shared"](), batch["separate"]())) and all(
            torch.equal(a[0], b[0]) for a, b in zip(switch["shared"](), switch["separate"]()))
        for _ in range(repeats):
            for what, calls, n in (("switch", switch, len(names)), ("mixed", batch, len(images))):
                for k, fn in calls.items():
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[f"{k}_{what}"].append((time.perf_counter() - start) / n * 1e3)
    return {"exact": exact, **{k: statistics.median(v) for k, v in times.items()}}


def worker(args: list[str]) -> dict:
    what, runs, size, repeats, device = args[0], [Path(r) for r in args[1].split(",")], *args[2:]
    if what == "speed":
        return speed(runs, int(size), int(repeats), device)
    return memory(what, runs, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="1,2,4,8", help="numbers of tasks to measure (at most 8)")
    ap.add_argument("--size", type=int, default=96, help="input images are SIZE x SIZE")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is reported)")
    ap.add_argument("--iters", type=int, default=3, help="training iterations of each run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=str(REPO / "results" / "bench_multitask"), help="where the runs are cached")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker)))
        return
    runs = prepare(Path(a.work), a.iters)
    counts = [int(n) for n in a.tasks.split(",")]
    if not all(1 <= n <= len(runs) for n in counts):
        sys.exit(f"--tasks: each number must be 1..{len(runs)}")
    rows = []
    for n in counts:
        row = {"tasks": n}
        for what in ("shared", "separate", "speed"):
            cmd = [sys.executable, __file__, "--worker", what, ",".join(map(str, runs[:n])), str(a.size),
                   str(a.repeats), a.device]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode:
                sys.exit(f"{what} with {n} tasks failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            row.update({f"{what}_{k}": v for k, v in result.items()} if what != "speed" else result)
            print(f"measured {what} x{n}", file=sys.stderr)
        rows.append(row)
    report(rows, a)


def report(rows: list[dict], a: argparse.Namespace) -> None:
    print(f"ResNet-18 (width 64) + FCN heads, {a.size}x{a.size} input, {a.device}, 1 thread. Memory: added by "
          f"loading the models (RSS; CUDA: allocated), each in a fresh process. Latency: median of {a.repeats} "
          f"alternating rounds; 'switch' = batch 1, a task switch per image; 'mixed' = one batch, 2 images per "
          f"task. Ratios: separate / shared")
    print(f"{'tasks':>5s} | {'RSS MiB':>8s} {'separate':>8s} {'ratio':>5s} | {'tensors':>7s} {'separate':>8s} "
          f"{'ratio':>5s} | {'switch ms':>9s} {'separate':>8s} {'ratio':>5s} | {'mixed ms':>8s} {'separate':>8s} "
          f"{'ratio':>5s} | exact")
    for r in rows:
        def cols(shared: float, separate: float, width: int, fmt: str) -> str:
            return f"{shared:{width}{fmt}} {separate:8{fmt}} {separate / max(shared, 1e-9):5.2f}"

        print(f"{r['tasks']:5d} | {cols(r['shared_loaded_mib'], r['separate_loaded_mib'], 8, '.1f')} | "
              f"{cols(r['shared_storage_mib'], r['separate_storage_mib'], 7, '.1f')} | "
              f"{cols(r['shared_switch'], r['separate_switch'], 9, '.2f')} | "
              f"{cols(r['shared_mixed'], r['separate_mixed'], 8, '.2f')} | {'yes' if r['exact'] else 'NO'}")
    if not all(r["exact"] for r in rows):
        sys.exit("a task's output differs from its separately loaded run's")


if __name__ == "__main__":
    main()
