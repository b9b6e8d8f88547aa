"""``segprompt browse``: the training pipeline's samples as the model sees them, after augmentation
(docs/watch.md, "Looking at the training samples").

The samples are the exact ones of training iteration ``N``: the same :class:`TrainBatchSampler`
stream (dataset index and augmentation seed of each position, from ``runtime.seed``) and the same
:class:`~segprompt.data.transforms.TrainTransform`, so sample ``k`` of iteration ``N`` here is what
the ``k``-th image of that iteration's global batch was, whatever the number of processes or
workers. Each file shows the augmented image (before normalisation; padding in the mean colour)
and beside it the label overlaid in the palette's colours, ignored pixels darkened.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from segprompt.build import build_train_dataset, dataset_meta, is_recognition
from segprompt.config import load_recipe
from segprompt.data.sampler import TrainBatchSampler
from segprompt.errors import SegpromptError
from segprompt.evaluation.inference import overlay
from segprompt.io import atomic_write_bytes


def training_samples(cfg, iteration: int) -> Iterator[tuple[int, int, dict]]:
    """``(iteration, position in its global batch, sample)`` from ``iteration`` (1-based) on."""
    dataset = build_train_dataset(cfg, dataset_meta(cfg))
    batch = cfg.data.batch_size
    # one process, no accumulation, micro-batch = the global batch: the same stream positions and
    # seeds as any world size or accumulation (segprompt/data/sampler.py)
    sampler = TrainBatchSampler(len(dataset), batch, seed=cfg.runtime.seed, start_step=iteration - 1)
    for step, items in enumerate(sampler, start=iteration):
        for k, item in enumerate(items):
            yield step, k, dataset[item]


def browse(recipe: str | Path, out: str | Path, *, count: int = 8, iteration: int = 1,
           overrides: list[str] = (), force: bool = False) -> list[Path]:
    """Write ``count`` training samples from ``iteration`` on into ``out``; returns the files."""
    cfg = load_recipe(recipe, list(overrides))
    if is_recognition(cfg):
        raise SegpromptError(f"browse shows segmentation samples with their labels; '{recipe}' trains an image "
                             f"classifier ({cfg.data.dataset})")
    if count < 1 or iteration < 1:
        raise SegpromptError(f"-n and --iteration must be at least 1 (got {count} and {iteration})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SegpromptError(f"--out '{out}' is a file; pass a folder")
    meta = dataset_meta(cfg)
    files: list[Path] = []
    for step, k, sample in training_samples(cfg, iteration):
        path = out / f"iter{step:06d}_{k:03d}_{sample['stem']}.png"
        if path.exists() and not force:
            raise SegpromptError(f"'{path}' already exists; choose another --out, or add --force to replace it")
        image = sample["img"].permute(1, 2, 0).numpy()
        label = sample["label"].numpy()
        panel = np.concatenate([image, overlay(label, image, meta.palette)], axis=1)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        if not ok:
            raise SegpromptError(f"could not encode '{path}'")
        atomic_write_bytes(path, buf.tobytes())
        files.append(path)
        if len(files) == count:
            return files
    return files
