"""What a converter produces: a :class:`Plan` of :class:`Job` s, each writing some :class:`Sample` s,
the atomic write and the verification of one sample, and the ordered process pool both run in."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segprompt.data.meta import ANN_DIR, IMG_DIR
from segprompt.data.prepare.labels import IGNORE_INDEX, decode_image, encode_png
from segprompt.data.truncation import truncated_file
from segprompt.errors import SegpromptError
from segprompt.io import atomic_write_bytes

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm")


# progress(stage, done, total): stages are "hashing", "converting", "verifying", "class prior"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Sample:
    split: str
    stem: str
    img_ext: str  # e.g. ".png", ".jpg"

    @property
    def image_name(self) -> str:
        return self.stem + self.img_ext

    def image(self, root: Path) -> Path:
        return root / IMG_DIR / self.split / self.image_name

    def label(self, root: Path) -> Path:
        return root / ANN_DIR / self.split / f"{self.stem}.png"


@dataclass(frozen=True)
class Job:
    """``fn(root, *args)`` writes ``samples`` and returns each one's label values (one list per sample)."""

    fn: Callable[..., list[list[int]]]  # a module-level function (pickled by reference)
    args: tuple
    samples: tuple[Sample, ...]

    def finished(self, root: Path) -> bool:
        return all(s.image(root).is_file() and s.label(root).is_file() for s in self.samples)


@dataclass
class Plan:
    dataset: str
    classes: list[str]
    palette: list[list[int]]
    jobs: list[Job]
    used: dict[str, list[str]]  # role -> members read (for folder fingerprints)
    facts: dict[str, Any] = field(default_factory=dict)  # dataset facts recorded in meta.extra

    def samples(self) -> list[Sample]:
        return [s for j in self.jobs for s in j.samples]


def write_sample(root: Path, sample: Sample, image: bytes | np.ndarray, label: np.ndarray,
                 num_classes: int, where: str) -> list[int]:
    """Check one converted sample and write it (image first, then label, each atomically).

    ``image``: the original file's bytes (kept as they are) or a BGR array (written as PNG).
    Returns the label values present.
    """
    shape = decode_image(image, where).shape[:2] if isinstance(image, bytes) else image.shape[:2]
    if shape != label.shape:
        raise SegpromptError(f"{where}: the image is {shape[1]}x{shape[0]} but its label is "
                             f"{label.shape[1]}x{label.shape[0]} (width x height); they must be equal")
    values = np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist()
    bad = [v for v in values if v >= num_classes and v != IGNORE_INDEX]
    if bad:  # the converter's own mapping went wrong: never write such a label
        raise SegpromptError(f"{where}: converted label values {bad} outside {{0..{num_classes - 1}, 255}}")
    atomic_write_bytes(sample.image(root), image if isinstance(image, bytes) else encode_png(image))
    atomic_write_bytes(sample.label(root), encode_png(label))
    return values


def verify_sample(root: Path, sample: Sample, num_classes: int) -> list[int]:
    """Re-read one written sample: both files decode, sizes agree, labels in {0..K-1, 255}."""
    img_path, lbl_path = sample.image(root), sample.label(root)
    for kind, path in (("image", img_path), ("label", lbl_path)):  # before decoding, which warns on stderr
        if not path.is_file():
            raise SegpromptError(f"{kind} '{path}' is missing")
        cut = truncated_file(path)
        if cut:
            raise SegpromptError(f"{kind} '{path}' is cut short ({cut})")
    img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
    if img is None:
        raise SegpromptError(f"image '{img_path}' does not decode")
    lbl = cv2.imread(str(lbl_path), cv2.IMREAD_UNCHANGED)
    if lbl is None:
        raise SegpromptError(f"label '{lbl_path}' does not decode")
    if lbl.ndim != 2 or lbl.dtype != np.uint8:
        raise SegpromptError(f"label '{lbl_path}' is not a single-channel 8-bit PNG ({lbl.shape}, {lbl.dtype})")
    if img.shape[:2] != lbl.shape:
        raise SegpromptError(f"image '{img_path}' is {img.shape[1]}x{img.shape[0]} but label '{lbl_path}' is "
                             f"{lbl.shape[1]}x{lbl.shape[0]}")
    values = np.flatnonzero(np.bincount(lbl.ravel(), minlength=256)).tolist()
    bad = [v for v in values if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        raise SegpromptError(f"label '{lbl_path}' has values {bad} outside {{0..{num_classes - 1}, 255}}")
    return values


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _call(fn: Callable, args: tuple) -> Any:
    return fn(*args)


def parallel_map(fn: Callable, items: Sequence[tuple], nproc: int, stage: str,
                 progress: Progress | None = None) -> list:
    """``[fn(*item) for item in items]`` over ``nproc`` processes, in order, reporting progress.

    The first error cancels what has not started and is raised as it is. ``fn`` must be a module-level
    function; a script that calls this with ``nproc > 1`` needs the usual ``if __name__ == "__main__":``
    guard (workers are started fresh, see below).
    """
    total, results = len(items), [None] * len(items)
    if total == 0:
        return results
    if progress:
        progress(stage, 0, total)
    if nproc <= 1 or total <= 1:
        for i, item in enumerate(items):
            results[i] = fn(*item)
            if progress:
                progress(stage, i + 1, total)
        return results
    # Workers start from a clean process (forkserver, else spawn), never by forking this one: a fork
    # taken while OpenCV's thread pool holds a lock deadlocks the child.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=min(nproc, total), initializer=_worker_init,
                             mp_context=multiprocessing.get_context(method)) as pool:
        futures = {pool.submit(_call, fn, item): i for i, item in enumerate(items)}
        pending, done_count = set(futures), 0
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    results[futures[f]] = f.result()  # raises the worker's error
                    done_count += 1
                if progress:
                    progress(stage, done_count, total)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _verify_job(root: Path, samples: tuple[Sample, ...], num_classes: int) -> list[list[int]]:
    return [verify_sample(root, s, num_classes) for s in samples]


def _check_sample(root: Path, sample: Sample, num_classes: int) -> tuple[list[int] | None, str | None]:
    try:
        return verify_sample(root, sample, num_classes), None
    except SegpromptError as e:
        return None, str(e)
