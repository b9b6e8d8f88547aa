"""Procedural multi-class segmentation dataset (``segprompt prepare synthetic``).

Class 0 is a textured background; every other class is a shape family (disk, box, triangle, ...)
drawn with its own texture and colour. Classes come in pairs that share colour and texture and
differ only in shape, and from 12 classes on, shapes repeat with another texture and colour, so a
model needs both local appearance and object shape to tell them apart. Each image holds several
objects of random size, position and rotation that occlude each other.

``domain_shift`` in [0, 1] changes appearance continuously and leaves the labels unchanged: class
colours are hue-rotated, contrast drops, the background texture turns into streaks, and blur and
sensor noise grow. Sources at ``domain_shift=0`` and a target at ``1.0`` make a transfer task.

Every image is a function of ``(seed, split, index)`` alone (layout and appearance draw from two
separate generators, and no draw depends on ``domain_shift``), so changing split sizes or the shift
never changes other images or any label. The dataset is written to a temporary sibling folder that
is renamed to ``out`` at the end.
"""

from __future__ import annotations

import colorsys
import math
import os
import re
import secrets
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segprompt.data.meta import (
    ANN_DIR,
    IMG_DIR,
    META_FILE,
    DatasetMeta,
    golden_palette,
    read_meta,
    write_meta,
)
from segprompt.errors import SegpromptError, os_problem
from segprompt.io import move_aside, remove_stale_temporaries, temp_prefix

__all__ = ["generate_synthetic", "class_names", "DEFAULT_COUNTS", "MAX_CLASSES"]

GENERATOR_VERSION = 1  # bump when the same options start producing different images
DEFAULT_COUNTS = {"train": 64, "val": 16, "test": 16}
MAX_CLASSES = 32
IGNORE_INDEX = 255

TEXTURES = ("flat", "grain", "stripes", "dots", "checker")
_TEXTURE_ADJECTIVE = {"flat": "plain", "grain": "grainy", "stripes": "striped", "dots": "dotted",
                      "checker": "checkered"}


@dataclass(frozen=True)
class _ClassSpec:
    name: str
    shape: str
    texture: str
    colour_group: int


# Consecutive pairs share colour group and texture: only the shape tells them apart.
_BASE_CLASSES = (
    _ClassSpec("disk", "disk", "flat", 0),
    _ClassSpec("box", "box", "flat", 0),
    _ClassSpec("triangle", "triangle", "grain", 1),
    _ClassSpec("ring", "ring", "grain", 1),
    _ClassSpec("stripes", "bars", "stripes", 2),
    _ClassSpec("cross", "cross", "stripes", 2),
    _ClassSpec("star", "star", "dots", 3),
    _ClassSpec("hexagon", "hexagon", "dots", 3),
    _ClassSpec("diamond", "diamond", "checker", 4),
    _ClassSpec("crescent", "crescent", "checker", 4),
)


def _foreground_specs(num_classes: int, first_class: int = 0) -> list[_ClassSpec]:
    """Specs of classes 1..K-1: the base shapes, then the same shapes with another texture/colour.

    ``first_class`` skips that many base shapes, so two datasets can hold different object
    classes (a task shift: the demo's target has shape families its source never showed)."""
    if first_class:
        if first_class + num_classes - 1 > len(_BASE_CLASSES):
            raise SegpromptError(f"first_class {first_class} with {num_classes} classes needs "
                                 f"{first_class + num_classes - 1} base shapes; there are {len(_BASE_CLASSES)}")
        return list(_BASE_CLASSES[first_class: first_class + num_classes - 1])
    specs = list(_BASE_CLASSES[: num_classes - 1])
    for j in range(num_classes - 1 - len(_BASE_CLASSES)):
        base = _BASE_CLASSES[j % len(_BASE_CLASSES)]
        texture = TEXTURES[(TEXTURES.index(base.texture) + 1 + j // len(_BASE_CLASSES)) % len(TEXTURES)]
        specs.append(_ClassSpec(f"{_TEXTURE_ADJECTIVE[texture]}_{base.shape}", base.shape, texture,
                                len(_BASE_CLASSES) // 2 + j))
    return specs


def class_names(num_classes: int, first_class: int = 0) -> list[str]:
    return ["background"] + [s.name for s in _foreground_specs(num_classes, first_class)]


def _palette(num_classes: int) -> list[list[int]]:
    """Display colours: black background, then golden-ratio hues alternating in brightness."""
    return [[0, 0, 0], *golden_palette(num_classes - 1, saturation=0.85, phase=1)]


def _group_hsv(group: int) -> tuple[float, float, float]:
    """Appearance colour of a colour group: spread hues, saturated and fairly bright."""
    return ((0.02 + group * 0.381966) % 1.0, 0.6 + 0.3 * ((group * 0.7548777) % 1.0),
            0.65 + 0.3 * ((group * 0.5698403) % 1.0))


# --------------------------------------------------------------------------------------------- shapes

def _poly(mask: np.ndarray, cx: float, cy: float, radii: np.ndarray, angles: np.ndarray,
          value: int = 1) -> None:
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], value, cv2.LINE_8, shift=4)


def _rect(mask: np.ndarray, cx: float, cy: float, length: float, width: float, angle: float) -> None:
    pts = cv2.boxPoints(((cx, cy), (length, width), math.degrees(angle)))
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)


def _circle(mask: np.ndarray, cx: float, cy: float, r: float, value: int) -> None:
    cv2.circle(mask, (round(cx * 16), round(cy * 16)), max(round(r * 16), 16), value, -1, cv2.LINE_8, shift=4)


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float, angle: float,
                rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    if shape == "disk":
        _circle(mask, cx, cy, r, 1)
    elif shape == "box":
        _rect(mask, cx, cy, 2 * r * rng.uniform(0.65, 1.0), 2 * r * rng.uniform(0.65, 1.0), angle)
    elif shape == "triangle":
        _poly(mask, cx, cy, np.full(3, r), angle + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.25, 0.25, 3))
    elif shape == "ring":
        _circle(mask, cx, cy, r, 1)
        _circle(mask, cx, cy, r * rng.uniform(0.45, 0.65), 0)
    elif shape == "bars":
        nx, ny = -math.sin(angle), math.cos(angle)
        for k in (-1, 0, 1):
            _rect(mask, cx + k * 0.7 * r * nx, cy + k * 0.7 * r * ny, 2 * r, 0.38 * r, angle)
    elif shape == "cross":
        width = r * rng.uniform(0.45, 0.65)
        _rect(mask, cx, cy, 2 * r, width, angle)
        _rect(mask, cx, cy, 2 * r, width, angle + np.pi / 2)
    elif shape == "star":
        _poly(mask, cx, cy, np.tile([r, 0.45 * r], 5), angle + np.arange(10) * np.pi / 5)
    elif shape == "hexagon":
        _poly(mask, cx, cy, np.full(6, r), angle + np.arange(6) * np.pi / 3)
    elif shape == "diamond":
        _poly(mask, cx, cy, np.array([r, 0.6 * r, r, 0.6 * r]), angle + np.arange(4) * np.pi / 2)
    elif shape == "crescent":
        _circle(mask, cx, cy, r, 1)
        _circle(mask, cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle), 0.85 * r, 0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


# ----------------------------------------------------------------------------------------- appearance

def _texture(kind: str, xx: np.ndarray, yy: np.ndarray, unit: float, rng: np.random.Generator) -> np.ndarray:
    """A [0, 1] pattern over the pixel grid (xx, yy); ``unit`` scales its period with the image."""
    if kind == "flat":
        return np.zeros_like(xx)
    if kind == "grain":
        return np.clip((cv2.blur(rng.random(xx.shape, dtype=np.float32), (3, 3)) - 0.5) * 3 + 0.5, 0, 1)
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    period = rng.uniform(4.5, 8.0) * unit
    u = (xx * math.cos(theta) + yy * math.sin(theta)) * (2 * np.pi / period) + phase
    if kind == "stripes":
        return (np.sin(u) > 0).astype(np.float32)
    v = (yy * math.cos(theta) - xx * math.sin(theta)) * (2 * np.pi / period) + phase
    if kind == "dots":
        return (np.cos(u) * np.cos(v) > 0.45).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / np.pi) + np.floor(v / np.pi)) % 2).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _object_colour(group: int, shift: float, rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = _group_hsv(group)
    hue = (hue + rng.uniform(-0.02, 0.02) + 0.2 * shift) % 1.0  # domain shift: hue rotation
    sat = min(sat * rng.uniform(0.9, 1.1), 1.0)
    val = min(val * rng.uniform(0.85, 1.1), 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32)


def _background(h: int, w: int, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Earthy colour blobs with grain, blended by ``shift`` into grey-blue horizontal streaks."""
    blobs = cv2.resize(rng.random((6, 6, 3), dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    streaks = cv2.resize(rng.random((max(h // 6, 2), 3, 1), dtype=np.float32), (w, h),
                         interpolation=cv2.INTER_LINEAR)[..., None]
    grain = rng.standard_normal((h, w, 1), dtype=np.float32)
    source = np.array([0.38, 0.36, 0.26], np.float32) + blobs * np.array([0.22, 0.2, 0.16], np.float32)
    target = np.array([0.3, 0.34, 0.4], np.float32) + streaks * np.array([0.3, 0.3, 0.32], np.float32)
    return (1 - shift) * source + shift * target + (0.04 + 0.03 * shift) * grain


def _render(specs: list[_ClassSpec], h: int, w: int, shift: float, ignore_border: bool,
            layout: np.random.Generator, look: np.random.Generator,
            object_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its uint8 label; ``layout`` decides the label, ``look`` the pixels."""
    img = _background(h, w, shift, look)
    label = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = min(h, w)
    for _ in range(int(layout.integers(3, 9))):
        cls = int(layout.integers(1, len(specs) + 1))
        spec = specs[cls - 1]
        r = layout.uniform(0.07, 0.2) * side * object_scale
        cx, cy, angle = layout.uniform(0, w), layout.uniform(0, h), layout.uniform(0, 2 * np.pi)
        mask = _shape_mask(spec.shape, h, w, cx, cy, r, angle, layout)
        y0, y1 = max(int(cy - 1.5 * r), 0), min(int(cy + 1.5 * r) + 2, h)
        x0, x1 = max(int(cx - 1.5 * r), 0), min(int(cx + 1.5 * r) + 2, w)
        inside = mask[y0:y1, x0:x1].astype(bool)
        if not inside.any():
            continue
        sx, sy = xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]
        colour = _object_colour(spec.colour_group, shift, look)
        texture = _texture(spec.texture, sx, sy, side / 128, look)
        light = look.uniform(0, 2 * np.pi)  # linear shading across the object, ±15 %
        shade = 1 + 0.15 * np.clip(((sx - cx) * math.cos(light) + (sy - cy) * math.sin(light)) / r, -1, 1)
        pixels = colour * ((1 - 0.45 * texture) * shade)[..., None]
        img[y0:y1, x0:x1][inside] = pixels[inside]
        label[y0:y1, x0:x1][inside] = cls
    if ignore_border:  # 1-px ignore band where the class changes, like eroded ground truth
        edge = np.zeros((h, w), bool)
        edge[:, :-1] = label[:, :-1] != label[:, 1:]
        edge[:-1, :] |= label[:-1, :] != label[1:, :]
        label[edge] = IGNORE_INDEX
    mean = img.mean(axis=(0, 1))
    img = mean + (img - mean) * (1 - 0.4 * shift)  # domain shift: contrast
    if shift > 0:
        img = cv2.GaussianBlur(img, (0, 0), 0.8 * shift)  # domain shift: blur
    img += look.standard_normal((h, w, 3), dtype=np.float32) * (0.01 + 0.035 * shift)  # sensor noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


# ---------------------------------------------------------------------------------------- the dataset

def _check_options(num_classes: int, image_size: tuple[int, int], counts: dict[str, int],
                   domain_shift: float) -> None:
    if not 2 <= num_classes <= MAX_CLASSES:
        raise SegpromptError(f"num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    if len(image_size) != 2 or min(image_size) < 32:
        raise SegpromptError(f"image_size must be (height, width), each at least 32, got {image_size}")
    if not 0.0 <= domain_shift <= 1.0:
        raise SegpromptError(f"domain_shift must be in [0, 1], got {domain_shift}")
    for split, n in counts.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
            raise SegpromptError(f"split name {split!r} must use letters, digits, '_' or '-' only")
        if n < 0:
            raise SegpromptError(f"split '{split}' count must be >= 0, got {n}")


def _same_dataset(out: Path, options: dict[str, Any]) -> DatasetMeta | None:
    """The meta of ``out`` when it was generated with ``options`` and still holds every file."""
    if not (out / META_FILE).is_file():
        return None
    try:
        meta = read_meta(out, "synthetic")
    except SegpromptError:
        return None
    if meta.extra.get("generator") != options:
        return None
    for split, n in meta.splits.items():
        for sub in (IMG_DIR, ANN_DIR):
            folder = out / sub / split
            if not folder.is_dir() or sum(1 for _ in folder.iterdir()) != n:
                return None
    return meta


def _image_seeds(seed: int, split: str, index: int) -> list[np.random.SeedSequence]:
    """Layout and appearance seeds of one image, from (seed, split, index) only."""
    return np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]).spawn(2)


def _write_splits(root: Path, specs: list, seed: int, counts: dict[str, int], size: tuple[int, int],
                  domain_shift: float, ignore_border: bool, object_scale: float,
                  progress: Callable[[int, int], None] | None) -> dict[str, list[int]]:
    """Render and write every image and label under ``root``; returns the label values per split."""
    h, w = size
    total, done = sum(counts.values()), 0
    label_values: dict[str, list[int]] = {}
    for split, n in counts.items():
        img_dir, ann_dir = root / IMG_DIR / split, root / ANN_DIR / split
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        present = np.zeros(256, bool)
        for i in range(n):
            layout_seq, look_seq = _image_seeds(seed, split, i)
            img, label = _render(specs, h, w, domain_shift, ignore_border,
                                 np.random.default_rng(layout_seq), np.random.default_rng(look_seq), object_scale)
            present |= np.bincount(label.ravel(), minlength=256) > 0
            stem = f"{i:05d}"
            if not (cv2.imwrite(str(img_dir / f"{stem}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                    and cv2.imwrite(str(ann_dir / f"{stem}.png"), label)):
                raise SegpromptError(f"could not write image {stem}.png under '{root}' (disk full?)")
            done += 1
            if progress is not None:
                progress(done, total)
        label_values[split] = np.flatnonzero(present).tolist()
    return label_values


def generate_synthetic(out: str | Path, *, seed: int = 0, num_classes: int = 6,
                       image_size: tuple[int, int] = (128, 128), counts: dict[str, int] | None = None,
                       domain_shift: float = 0.0, ignore_border: bool = True, force: bool = False,
                       progress: Callable[[int, int], None] | None = None, first_class: int = 0,
                       object_scale: float = 1.0) -> DatasetMeta:
    """Write the synthetic dataset to ``out`` in the prepared layout and return its meta.

    Args:
        out: dataset root to create.
        seed: base seed; image ``i`` of ``split`` depends on ``(seed, split, i)`` only.
        num_classes: classes including the background, 2..32.
        image_size: (height, width) of every image.
        counts: images per split, default ``{'train': 64, 'val': 16, 'test': 16}``.
        domain_shift: appearance shift in [0, 1]; labels do not depend on it.
        ignore_border: mark 1-px bands on class boundaries as ignore (255).
        force: replace an existing ``out`` generated differently; the old folder is renamed to
            ``<out>.old-<timestamp>``, never deleted.
        progress: called as ``progress(done, total)`` after each image.
        first_class: skip this many base shape families (another set of object classes).
        object_scale: multiplies every object's size (a scale shift; labels follow the pixels).

    An existing ``out`` generated with the same options is returned as is, without rewriting it.
    """
    out = Path(out)
    counts = {str(k): int(v) for k, v in (DEFAULT_COUNTS if counts is None else counts).items()}
    h, w = (int(v) for v in image_size)
    _check_options(num_classes, (h, w), counts, domain_shift)
    options = {"version": GENERATOR_VERSION, "seed": int(seed), "num_classes": int(num_classes),
               "image_size": [h, w], "counts": counts,
               "domain_shift": float(domain_shift), "ignore_border": bool(ignore_border)}
    # options at their defaults are left out, so folders generated before they existed still match
    if first_class:
        options["first_class"] = int(first_class)
    if object_scale != 1.0:
        if not 0.25 <= object_scale <= 2.0:
            raise SegpromptError(f"object_scale must be in [0.25, 2], got {object_scale}")
        options["object_scale"] = float(object_scale)

    if out.exists() and not out.is_dir():
        raise SegpromptError(f"'{out}' is a file, not a folder; pass another --out")
    existing = out.exists() and not (out.is_dir() and not any(out.iterdir()))  # an empty dir is free
    if existing and not force:
        meta = _same_dataset(out, options)
        if meta is not None:
            return meta
        raise SegpromptError(
            f"'{out}' already exists and was not generated with these options (seed, classes, "
            f"size, counts, shift). Pass another --out, or --force to replace it (the old folder is "
            f"kept as '{out.name}.old-<timestamp>').")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SegpromptError(f"cannot create {os_problem(e, out)}") from None
    # a killed run's half-written folder (its PID is in the name; live runs' folders are kept)
    remove_stale_temporaries(out.parent, out.name)
    tmp = out.parent / f"{temp_prefix(out)}{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # not mkdtemp: the dataset keeps the umask's mode, not 0700
    try:
        label_values = _write_splits(tmp, _foreground_specs(num_classes, first_class), seed, counts, (h, w),
                                     domain_shift, ignore_border, object_scale, progress)
        meta = DatasetMeta(name="synthetic", classes=class_names(num_classes, first_class), palette=_palette(num_classes),
                           ignore_index=IGNORE_INDEX, splits=dict(counts), label_values=label_values,
                           extra={"generator": options})
        write_meta(tmp, meta)
        if existing:
            move_aside(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
