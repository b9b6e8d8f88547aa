"""`segprompt predict`: segment your own images with a trained run, exactly as `segprompt eval` would.

- **Inputs**: image files, folders (walked recursively; hidden entries and the output folder are
  skipped) and globs, each becoming an :class:`InputImage` whose outputs keep its path relative to
  the folder (or the glob's fixed part) it was found under, and its stem.
- **Plan**: every output path is known before anything runs; two inputs writing the same file, or
  a file that already exists (without ``force``), are refused up front.
- **Loop**: images are decoded by the data layer's :func:`~segprompt.data.dataset.read_image` and
  the recipe's test pipeline in DataLoader workers; images of the same size are batched; a
  progress bar counts images per second; an unreadable image (truncated ones too) is reported
  and skipped, or stops the run with ``strict``.
- **Writers**: :func:`~segprompt.evaluation.inference.save_prediction`, the one ``eval --save-preds``
  uses, so predicting the val images reproduces its files byte for byte.

The loop runs one or more :class:`Job` on every image, each a :data:`Segment` callable (a batch
of images -> per-pixel scores) with its own test pipeline, palette and output folder: one run's
checkpoint, or each task of a :class:`~segprompt.serve.multitask.MultiTaskModel` (``predict
--tasks``: the frozen backbone loaded once, every image decoded once and segmented under every
task). docs/predict.md has the colour-layout rules and the design.
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from segprompt.build import build_test_transform, is_recognition
from segprompt.config import Recipe
from segprompt.data.dataset import (
    IMG_EXTS,
    BadImage,
    read_image,
    start_workers,
    worker_init,
)
from segprompt.data.transforms import TestTransform, normalize, to_tensor
from segprompt.distributed import resolve_device
from segprompt.errors import SegpromptError
from segprompt.evaluation.inference import (
    FORMATS,
    SLIDE_WINDOW,
    check_mode,
    save_prediction,
    segment_logits,
)
from segprompt.io import refuse_inputs_as_outputs
from segprompt.progress import progress_bar
from segprompt.runs.load import build_source_model, read_source
from segprompt.runs.rundir import CONFIG
from segprompt.runs.runlock import refuse_live_run
from segprompt.serve.multitask import MultiTaskModel, task_names

DEFAULT_FORMATS = ("index", "overlay")  # what `eval --save-preds` writes

Segment = Callable[[Tensor, tuple[int, int]], Tensor]
"""``segment(img, (H, W))``: ``img`` is B x 3 x h x w uint8 RGB on the device (the images after the
test pipeline, all of one size), (H, W) the images' size before it; returns B x K x H x W scores."""


@dataclass(frozen=True)
class InputImage:
    path: Path  # the file to read
    rel: Path  # where its outputs go under --out: its relative folder and its stem (no suffix)


# ---- inputs ------------------------------------------------------------------------------------

def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTS


def _under(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def _walk(folder: Path, skip: Path | None) -> Iterator[Path]:
    """The images below ``folder``, in sorted order; hidden files and folders, and ``skip``, left out."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _under(here / d, skip))
        yield from (here / n for n in sorted(filenames) if not n.startswith(".") and _is_image(Path(n)))


def _glob_base(pattern: str) -> Path:
    """The part of ``pattern`` before its first wildcard component: what outputs are relative to."""
    fixed = []
    for part in Path(pattern).parts:
        if _has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _expand(text: str, skip: Path | None) -> list[tuple[Path, Path]]:
    """``(file, its path relative to where it was found)`` for one INPUT argument."""
    path = Path(text)
    if path.is_dir():
        found = [(p, p.relative_to(path)) for p in _walk(path, skip)]
        if not found:
            raise SegpromptError(f"input folder '{path}' holds no images ({' '.join(IMG_EXTS)}, searched "
                                 f"recursively, hidden files skipped)")
        return found
    if path.is_file():  # named explicitly: read whatever its extension
        return [(path, Path(path.name))]
    if not _has_magic(text):
        if path.is_symlink():
            raise SegpromptError(f"input '{text}' is a symbolic link that leads nowhere (a loop, or a missing "
                                 f"target); give the image or folder itself")
        raise SegpromptError(f"input '{text}' does not exist; give image files, folders, or quoted globs "
                             f"such as 'photos/**/*.jpg'")
    base, found = _glob_base(text), []
    for match in map(Path, sorted(glob.glob(text, recursive=True))):
        if match.is_dir():
            found += [(p, p.relative_to(base)) for p in _walk(match, skip)]
        elif _is_image(match) and not _under(match, skip):
            found.append((match, match.relative_to(base)))
    if not found:
        raise SegpromptError(f"input pattern '{text}' matches no image ({' '.join(IMG_EXTS)})")
    return found


def discover(inputs: Sequence[str | Path], out: Path | None = None) -> list[InputImage]:
    """The images named by INPUT arguments (files, folders, globs), sorted by output path. Files
    under ``out`` (earlier predictions) are left out; the same file found twice counts once; two
    files that would write the same outputs are an error naming both."""
    if not inputs:
        raise SegpromptError("no INPUT given: name image files, folders or globs to predict")
    skip = out.resolve() if out is not None else None
    found: dict[Path, InputImage] = {}
    for raw in inputs:
        for path, rel in _expand(str(raw), skip):
            key = rel.with_suffix("")
            prev = found.get(key)
            if prev is not None and prev.path.resolve() != path.resolve():
                raise SegpromptError(f"inputs '{prev.path}' and '{path}' would both be written as '{key}' (same "
                                     f"relative folder and stem); rename one, or predict them into separate --out "
                                     f"folders")
            found[key] = InputImage(path, key)
    return sorted(found.values(), key=lambda item: item.rel.parts)


# ---- outputs -----------------------------------------------------------------------------------

def parse_formats(values: Sequence[str] | None) -> tuple[str, ...]:
    """``--format`` values (repeated and/or comma-separated) in the order given, duplicates dropped."""
    chosen = [v.strip() for value in values or () for v in value.split(",") if v.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise SegpromptError(f"--format {', '.join(unknown)}: choose from {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(chosen)) or DEFAULT_FORMATS


def output_paths(item: InputImage, out: Path, formats: Sequence[str]) -> list[Path]:
    return [out / item.rel.parent / FORMATS[f].format(stem=item.rel.name) for f in formats]


def check_outputs(items: Sequence[InputImage], out: Path, formats: Sequence[str], force: bool,
                  subdirs: Sequence[str] = ("",)) -> None:
    """Refuse, before any work, an ``out`` that is a file, two inputs writing one file, and (without
    ``force``) outputs that already exist; ``subdirs``: the folders under ``out`` the jobs write to."""
    if out.exists() and not out.is_dir():
        raise SegpromptError(f"--out '{out}' is a file, not a folder; choose another --out")
    refuse_live_run(out, "--out")
    refuse_inputs_as_outputs((p for sub in subdirs for item in items for p in output_paths(item, out / sub, formats)),
                             (item.path for item in items))
    owner: dict[Path, InputImage] = {}
    existing = []
    for item, sub in ((item, sub) for sub in subdirs for item in items):
        for path in output_paths(item, out / sub, formats):
            if path in owner:
                raise SegpromptError(f"inputs '{owner[path].path}' and '{item.path}' would both write '{path}'; "
                                     f"rename one, or predict them into separate --out folders")
            owner[path] = item
            if path.exists() or path.is_symlink():
                existing.append(path)
    if existing and not force:
        raise SegpromptError(f"{len(existing)} output file(s) already exist in '{out}', e.g. '{existing[0]}'; "
                             f"choose another --out, or pass --force to overwrite them")


# ---- the loop ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One model's share of the work: how it segments, its recipe's test pipeline, its colours, and
    the folder under ``--out`` its files go to (``""``: ``--out`` itself)."""

    segment: Segment
    transform: TestTransform
    palette: Sequence[Sequence[int]]
    num_classes: int
    subdir: str = ""
    legend: Sequence[str] | None = None  # the class names, when the images carry a legend (--legend)


class _Images(Dataset):
    """Each input decoded once as eval decodes an image (RGB, 8-bit, 3 channels) and put through
    every job's test pipeline (``img[j]``); an unreadable one becomes ``{"error": why}``."""

    def __init__(self, items: Sequence[InputImage], transforms: Sequence[TestTransform]):
        self.items, self.transforms = list(items), list(transforms)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image = read_image(self.items[i].path)
        except BadImage as e:
            return {"index": i, "error": str(e)}
        return {"index": i, "image": image, "img": [to_tensor(t(image)) for t in self.transforms]}


def _same_size(samples: list[dict[str, Any]], j: int) -> list[list[dict[str, Any]]]:
    """Samples grouped by (size after job ``j``'s test pipeline, original size), in order of first
    appearance."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((tuple(s["img"][j].shape), s["image"].shape[:2]), []).append(s)
    return list(groups.values())


@dataclass
class PredictResult:
    images: int = 0  # inputs predicted
    files: list[Path] = field(default_factory=list)  # outputs written
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (unreadable input, why)
    seconds: float = 0.0
    checkpoint: Path | None = None
    iteration: int | None = None
    tasks: list[str] = field(default_factory=list)  # predict --tasks: the task names (output subfolders)
    shared_bytes: int = 0  # predict --tasks: tensor storage the tasks share (MultiTaskModel.footprint)


def check_batch(batch: int) -> None:
    if batch < 1:
        raise SegpromptError(f"--batch must be at least 1, got {batch}")


@torch.no_grad()
def predict_images(items: Sequence[InputImage], jobs: Sequence[Job], out: Path, *, formats: Sequence[str],
                   device: torch.device, batch: int = 1, num_workers: int = 0, strict: bool = False,
                   show_progress: bool = True) -> PredictResult:
    """Segment ``items`` with every job and write ``formats`` of each under ``out / job.subdir``. Up
    to ``batch`` images are decoded at a time (once, whatever the number of jobs) and those of one
    size share a forward pass, so the result is the one of ``batch=1``."""
    check_batch(batch)
    loader = DataLoader(_Images(items, [job.transform for job in jobs]), batch_size=batch, num_workers=num_workers, collate_fn=list,
                        worker_init_fn=worker_init, pin_memory=device.type == "cuda")
    result, start = PredictResult(), time.perf_counter()
    with progress_bar(show_progress) as bar:
        task = bar.add_task("predict", total=len(items), info="", unit="img")
        for samples in start_workers(loader):
            readable = []
            for s in samples:
                if "error" not in s:
                    readable.append(s)
                elif strict:
                    raise SegpromptError(f"{s['error']} ({result.images} image(s) predicted before it); fix or "
                                         f"remove it, or drop --strict to skip unreadable images")
                else:
                    result.skipped.append((items[s["index"]].path, s["error"]))
            for j, job in enumerate(jobs):
                for group in _same_size(readable, j):
                    img = torch.stack([s["img"][j] for s in group]).to(device, non_blocking=True)
                    preds = job.segment(img, tuple(group[0]["image"].shape[:2])).argmax(1).cpu().numpy()
                    for s, pred in zip(group, preds):
                        item = items[s["index"]]
                        result.files += save_prediction(out / job.subdir / item.rel.parent, item.rel.name, pred,
                                                        s["image"], job.palette, formats=formats,
                                                        num_classes=job.num_classes, legend=job.legend)
            result.images += len(readable)
            bar.update(task, advance=len(samples), info=f"{len(result.skipped)} skipped" if result.skipped else "")
    result.seconds = time.perf_counter() - start
    return result


# ---- the model ---------------------------------------------------------------------------------

def recipe_segmenter(model: nn.Module, cfg: Recipe, device: torch.device, *, mode: str, tta: bool) -> Segment:
    """:data:`Segment` of one recipe's model: normalise as the recipe says, then the recipe's
    inference (``eval``'s own call, :func:`~segprompt.evaluation.inference.segment_logits`)."""
    def segment(img: Tensor, out_size: tuple[int, int]) -> Tensor:
        return segment_logits(model, normalize(img, cfg.data.mean, cfg.data.std), out_size, cfg, device,
                              mode=mode, tta=tta)
    return segment


def predict(target: str | Path, inputs: Sequence[str | Path], out: str | Path, *, checkpoint: str | None = None,
            mode: str | None = None, tta: bool | None = None, formats: Sequence[str] = DEFAULT_FORMATS,
            batch: int = 1, device: str | None = None, strict: bool = False, force: bool = False,
            overrides: Sequence[str] = (), weights: str | Path | None = None, legend: bool = False,
            show_progress: bool = True) -> PredictResult:
    """``segprompt predict``: inputs and outputs are checked first, then the model is loaded as
    ``eval`` loads it and every input segmented with the recipe's test pipeline and inference."""
    out, formats = Path(out), parse_formats(formats)
    check_batch(batch)
    items = discover(inputs, out)
    check_outputs(items, out, formats, force)
    src = read_source(target, checkpoint, overrides=overrides, weights=weights)
    cfg = src.cfg
    if is_recognition(cfg):
        raise SegpromptError(f"the recipe of '{target}' trains an image classifier ({cfg.data.dataset}); "
                             f"predict writes segmentation maps")
    mode = mode or cfg.evaluation.mode
    check_mode(cfg, mode)
    tta = cfg.evaluation.tta if tta is None else tta
    dev = resolve_device(device or cfg.runtime.device, key="--device" if device else "runtime.device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    model = build_source_model(src).to(dev)
    job = Job(recipe_segmenter(model, cfg, dev, mode=mode, tta=tta), build_test_transform(cfg), src.meta.palette,
              src.meta.num_classes, legend=src.meta.classes if legend else None)
    result = predict_images(items, [job], out, formats=formats, device=dev, batch=batch,
                            num_workers=cfg.runtime.num_workers, strict=strict, show_progress=show_progress)
    result.checkpoint, result.iteration = src.path, src.state.get("iteration")
    return result


_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_tasks(values: Sequence[str]) -> list[Path] | dict[str, Path]:
    """``--tasks`` values (repeated and/or comma-separated): run directories, all given as
    ``NAME=RUN_DIR`` (NAME is the output subfolder) or none (named by :func:`task_names`)."""
    entries = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not entries:
        raise SegpromptError("--tasks names no run: give run directories, e.g. --tasks results/a/RUN,results/b/RUN")
    named = [e for e in entries if "=" in e]
    if not named:
        return [Path(e) for e in entries]
    if len(named) != len(entries):
        raise SegpromptError(f"--tasks mixes NAME=RUN_DIR and bare run directories ({', '.join(entries)}); name "
                             f"every task or none")
    runs: dict[str, Path] = {}
    for entry in named:
        name, _, run = entry.partition("=")
        if not _TASK_NAME.fullmatch(name) or name in (".", ".."):
            raise SegpromptError(f"--tasks '{entry}': task name '{name}' becomes a folder under --out; use letters, "
                                 f"digits, '_', '.' and '-' only")
        if name in runs:
            raise SegpromptError(f"--tasks names task '{name}' twice; give each task one name")
        runs[name] = Path(run)
    return runs


def predict_tasks(tasks: Sequence[str], inputs: Sequence[str | Path], out: str | Path, *,
                  checkpoint: str | None = None, mode: str | None = None, tta: bool | None = None,
                  formats: Sequence[str] = DEFAULT_FORMATS, batch: int = 1, device: str | None = None,
                  strict: bool = False, force: bool = False, weights: str | Path | None = None,
                  legend: bool = False, show_progress: bool = True) -> PredictResult:
    """``segprompt predict --tasks``: every input under every task, into ``out/<task>/``. The runs are
    loaded as one :class:`MultiTaskModel` (frozen backbone once, each run's delta once; runs on
    other frozen weights are refused), each image is decoded once, and each task segments it
    with its own recipe's test pipeline and inference, so ``out/<task>/`` holds exactly what
    ``segprompt predict <task's run>`` writes (docs/predict.md)."""
    out, formats = Path(out), parse_formats(formats)
    check_batch(batch)
    if checkpoint is not None and checkpoint not in ("best", "last"):
        raise SegpromptError(f"--checkpoint {checkpoint} with --tasks: each run's best or last checkpoint is served "
                             f"(a deployed.pt holds the whole model, which cannot share a backbone)")
    named = task_names(parse_tasks(tasks))
    items = discover(inputs, out)
    check_outputs(items, out, formats, force, subdirs=list(named))
    dev = resolve_device(device or "auto", key="--device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    mt = MultiTaskModel.from_runs(named, checkpoint=checkpoint or "best", device=dev, weights=weights)
    jobs = []
    for name in mt.tasks:
        task = mt.task(name)
        if is_recognition(task.cfg):
            raise SegpromptError(f"task '{name}' ({task.run_dir}) trains an image classifier "
                                 f"({task.cfg.data.dataset}); predict writes segmentation maps")
        task_mode = mode or task.cfg.evaluation.mode
        check_mode(task.cfg, task_mode, where=f"task '{name}' ({task.run_dir / CONFIG})",
                   fix=f"--set does not apply with --tasks: predict that run alone with --mode slide and e.g. "
                       f"{SLIDE_WINDOW}, or drop --mode slide")
        task_tta = task.cfg.evaluation.tta if tta is None else tta
        jobs.append(Job(recipe_segmenter(mt.model(name), task.cfg, dev, mode=task_mode, tta=task_tta),
                        build_test_transform(task.cfg), task.palette, task.num_classes, subdir=name,
                        legend=task.classes if legend else None))
    workers = max(mt.task(name).cfg.runtime.num_workers for name in mt.tasks)
    result = predict_images(items, jobs, out, formats=formats, device=dev, batch=batch, num_workers=workers,
                            strict=strict, show_progress=show_progress)
    result.tasks, result.shared_bytes = mt.tasks, mt.footprint()["shared"]
    return result


def summary(result: PredictResult, out: Path, listed: int = 20) -> tuple[str, list[str]]:
    """What ``segprompt predict`` prints: one line of what was done, and a line per skipped image
    (the first ``listed``) with their count."""
    it = f" (iteration {result.iteration})" if result.iteration is not None else ""
    what = (f"under {len(result.tasks)} task(s) ({', '.join(result.tasks)}; {result.shared_bytes / 2**20:.1f} MiB of "
            f"frozen tensors shared)" if result.tasks else f"with {result.checkpoint}{it}")
    done = (f"predicted {result.images} image(s) in {result.seconds:.1f} s "
            f"({result.images / max(result.seconds, 1e-9):.1f} img/s) {what}; "
            f"wrote {len(result.files)} file(s) to {out}")
    problems = [f"skipped: {why}" for _, why in result.skipped[:listed]]
    if result.skipped:
        more = f" ({len(result.skipped) - listed} more not listed)" if len(result.skipped) > listed else ""
        problems.append(f"skipped {len(result.skipped)} unreadable image(s){more}; --strict makes that an error")
    return done, problems
