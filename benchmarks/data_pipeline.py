"""Per-worker throughput of segprompt's training data pipeline against PIL + torchvision.transforms.

Both pipelines decode ADE20K-sized JPEGs (about 683x512) and their 150-class PNG labels from disk
and produce normalized 512x512 float crops with mmseg's ADE20K augmentation: random resize to scale
(2048, 512) with ratio 0.5-2.0, random crop 512 with cat_max_ratio 0.75, horizontal flip,
photometric distortion, normalize, pad. Ours reads with cv2.imread and runs
``segprompt.data.transforms``; the baseline reads with PIL.Image.open and runs the torchvision
equivalent (ColorJitter for the photometric distortion). One process, one thread, no DataLoader:
the rate is what one DataLoader worker delivers. Rounds alternate between the two pipelines so both
see the same machine conditions.

    python benchmarks/data_pipeline.py [--images N] [--seconds S]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
except Exception as e:  # noqa: BLE001 - any import failure means no baseline
    raise SystemExit(f"the baseline needs a working torchvision (import failed: {e})") from None

from segprompt.data.transforms import (
    TrainTransform,
    label_to_tensor,
    normalize,
    to_tensor,
)

SCALE = (2048, 512)
RATIO_RANGE = (0.5, 2.0)
CROP = 512
CAT_MAX_RATIO = 0.75
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
IGNORE = 255
NUM_CLASSES = 150


def make_images(folder: Path, n: int, seed: int = 0) -> list[tuple[Path, Path]]:
    """``n`` ADE20K-like JPEG/PNG pairs: piecewise-constant 150-class labels, textured images."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        h, w = (512, 683) if i % 4 else (683, 512)  # mostly landscape, some portrait
        label = cv2.resize(rng.integers(0, NUM_CLASSES, (4, 5), dtype=np.uint8), (w, h),
                           interpolation=cv2.INTER_NEAREST)
        label[: h // 10] = IGNORE  # an unlabelled band, as ADE20K's "other objects"
        colours = rng.integers(0, 256, (256, 3)).astype(np.float32)
        noise = cv2.GaussianBlur(rng.normal(0, 24, (h, w, 3)).astype(np.float32), (0, 0), 1.5)
        img = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
        img_path, label_path = folder / f"{i:03d}.jpg", folder / f"{i:03d}.png"
        cv2.imwrite(str(img_path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(label_path), label)
        pairs.append((img_path, label_path))
    return pairs


class Ours:
    def __init__(self) -> None:
        self.transform = TrainTransform(scale=SCALE, ratio_range=RATIO_RANGE, crop_size=(CROP, CROP),
                                        cat_max_ratio=CAT_MAX_RATIO, flip_prob=0.5, photometric=True,
                                        ignore_index=IGNORE)

    def __call__(self, img_path: Path, label_path: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = cv2.cvtColor(cv2.imread(str(img_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        img, label = self.transform(img, label, np.random.default_rng(seed))
        return normalize(to_tensor(img), MEAN, STD), label_to_tensor(label)


class Baseline:
    """The usual PIL + torchvision.transforms pipeline with mmseg's resize/crop rules."""

    def __init__(self) -> None:
        self.jitter = T.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360)
        self.normalize = T.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD])

    def __call__(self, img_path: Path, label_path: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        random.seed(seed)
        torch.manual_seed(seed)
        img = Image.open(img_path).convert("RGB")
        label = Image.open(label_path)
        # RandomResize: scale * ratio, then keep-ratio rescale.
        ratio = random.uniform(*RATIO_RANGE)
        long, short = int(SCALE[0] * ratio), int(SCALE[1] * ratio)
        w, h = img.size
        factor = min(long / max(h, w), short / min(h, w))
        size = (int(w * factor + 0.5), int(h * factor + 0.5))
        img = img.resize(size, Image.BILINEAR)
        label = label.resize(size, Image.NEAREST)
        # RandomCrop with mmseg's cat_max_ratio retries.
        w, h = size
        seg = np.asarray(label)
        for _ in range(10):
            top, left = random.randint(0, max(h - CROP, 0)), random.randint(0, max(w - CROP, 0))
            values, counts = np.unique(seg[top:top + CROP, left:left + CROP], return_counts=True)
            counts = counts[values != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
                break
        ch, cw = min(CROP, h - top), min(CROP, w - left)
        img, label = TF.crop(img, top, left, ch, cw), TF.crop(label, top, left, ch, cw)
        if random.random() < 0.5:
            img, label = TF.hflip(img), TF.hflip(label)
        img = self.normalize(TF.to_tensor(self.jitter(img)))
        target = torch.from_numpy(np.array(label, dtype=np.int64))
        img = F.pad(img, (0, CROP - cw, 0, CROP - ch), value=0.0)
        target = F.pad(target, (0, CROP - cw, 0, CROP - ch), value=IGNORE)
        return img, target


def run_round(pipeline: Callable, pairs: list[tuple[Path, Path]], n: int, start: int) -> float:
    """Seconds for ``n`` samples, cycling through ``pairs``."""
    t0 = time.perf_counter()
    for k in range(start, start + n):
        img, label = pipeline(*pairs[k % len(pairs)], k)
        assert img.shape == (3, CROP, CROP) and img.dtype == torch.float32 and label.shape == (CROP, CROP)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40, help="samples per pipeline per round")
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement time, both pipelines")
    args = parser.parse_args()
    cv2.setNumThreads(0)
    torch.set_num_threads(1)

    pipelines = {"segprompt (cv2)": Ours(), "PIL + torchvision": Baseline()}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_images(Path(tmp), 20)
        for pipeline in pipelines.values():  # warm-up: page cache, lazy imports
            run_round(pipeline, pairs, 5, 0)
        seconds = dict.fromkeys(pipelines, 0.0)
        images = dict.fromkeys(pipelines, 0)
        rounds = 0
        t0 = time.perf_counter()
        while rounds < 2 or time.perf_counter() - t0 < args.seconds:
            for name, pipeline in pipelines.items():
                seconds[name] += run_round(pipeline, pairs, args.images, rounds * args.images)
                images[name] += args.images
            rounds += 1

    rates = {name: images[name] / seconds[name] for name in pipelines}
    print(f"{rounds} alternating rounds of {args.images} images, 512x512 crops, 1 thread per pipeline")
    for name, rate in rates.items():
        print(f"  {name:<20s} {rate:7.1f} images/s per worker")
    ours, baseline = rates.values()
    print(f"  ratio ours/baseline  {ours / baseline:7.2f}x")


if __name__ == "__main__":
    main()
