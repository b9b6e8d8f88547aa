"""The one dataset class, over the prepared layout every `segprompt prepare` writes.

``ROOT/img_dir/<split>/<stem>.<ext>`` with ``ROOT/ann_dir/<split>/<stem>.png`` (single-channel
uint8 train IDs, 255 = ignore) and ``ROOT/meta.json``. Labels are never shifted here: every
remapping happened once, at prepare time. Each sample is checked as it is read (readable image,
equal image/label sizes, label values in {0..K-1, ignore}), so a wrong label fails with the file
name instead of a device-side assert or a silently wrong metric. A JPEG or PNG cut short is
unreadable too, though OpenCV would decode it (:mod:`segprompt.data.truncation`).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from segprompt.data.meta import ANN_DIR, IMG_DIR, DatasetMeta, shared_stem
from segprompt.data.pixel_limit import over_limit
from segprompt.data.transforms import (
    TestTransform,
    TrainTransform,
    label_to_tensor,
    to_tensor,
)
from segprompt.data.truncation import truncated
from segprompt.data.view import identity_view
from segprompt.errors import SegpromptError

IMG_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm")


class BadImage(Exception):
    """An image that could not be decoded (may be skipped when the recipe allows it)."""


def _decode(path: Path, flags: int) -> tuple[np.ndarray | None, str]:
    """(the decoded array or None, why not) of an image file. Truncation is checked first: libjpeg
    would otherwise print its own "Premature end of JPEG file" to stderr before our message."""
    try:
        data = path.read_bytes()
    except OSError as e:  # read here, not by imread, which would print its own warning to stderr
        return None, f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
    cut = truncated(data)
    if cut:
        return None, cut
    too_big = over_limit(data)  # from the header, before anything is decoded
    if too_big:
        return None, too_big
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    return (None, "the file is empty or corrupt") if img is None else (img, "")


def read_image(path: Path) -> np.ndarray:
    img, why = _decode(path, cv2.IMREAD_COLOR)
    if img is None:
        raise BadImage(f"cannot read image '{path}': {why}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: Path) -> np.ndarray:
    lbl, why = _decode(path, cv2.IMREAD_UNCHANGED)
    if lbl is None:
        raise SegpromptError(f"cannot read label '{path}': {why}")
    if lbl.ndim != 2 or lbl.dtype != np.uint8:
        raise SegpromptError(
            f"label '{path}' must be a single-channel 8-bit PNG of class ids (got shape {lbl.shape}, "
            f"{lbl.dtype}); re-run `segprompt prepare`, which writes labels in that form")
    return lbl


class SegDataset(Dataset):
    """Training items are ``(index, augmentation seed)`` pairs from the sampler; test items are indices.

    Every item carries ``"view"``, a float32 tensor ``(y0, x0, y1, x1, flipped)``: the part of the
    original image it covers (the training crop; the whole image at test time), see docs/spm.md."""

    def __init__(self, root: str | Path, split: str, meta: DatasetMeta, *,
                 train_transform: TrainTransform | None = None, test_transform: TestTransform | None = None,
                 skip_bad_images: bool = False, subset: int | None = None, subset_seed: int = 0):
        self.root = Path(root)
        self.split = split
        self.meta = meta
        self.num_classes = meta.num_classes
        self.ignore_index = meta.ignore_index
        self.train_transform = train_transform
        self.test_transform = test_transform
        self.skip_bad_images = skip_bad_images
        img_dir, ann_dir = self.root / IMG_DIR / split, self.root / ANN_DIR / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                have = sorted(p.name for p in (self.root / IMG_DIR).glob("*") if p.is_dir())
                raise SegpromptError(f"split folder '{d}' does not exist (splits prepared in "
                                     f"'{self.root}': {', '.join(have) or 'none'})")
        # Sorted explicitly: glob order is not stable across file systems.
        self.images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMG_EXTS)
        if not self.images:
            raise SegpromptError(f"split folder '{img_dir}' holds no images")
        twins = shared_stem(self.images)
        if twins:
            raise SegpromptError(f"'{twins[0]}' and '{twins[1]}' share the stem '{twins[1].stem}', so both would pair "
                                 f"with the label '{ann_dir / (twins[1].stem + '.png')}'; keep one of them")
        if subset is not None:
            if not 1 <= subset <= len(self.images):
                raise SegpromptError(f"data.train_subset {subset} is not in 1..{len(self.images)} "
                                     f"(the images of '{img_dir}')")
            pick = np.random.default_rng(subset_seed).choice(len(self.images), subset, replace=False)
            self.images = [self.images[i] for i in sorted(pick)]
        self.labels = [ann_dir / f"{p.stem}.png" for p in self.images]
        missing = [str(p) for p in self.labels if not p.is_file()]
        if missing:
            raise SegpromptError(f"{len(missing)} image(s) in '{img_dir}' have no label in '{ann_dir}', "
                                 f"e.g. '{missing[0]}'")

    def __len__(self) -> int:
        return len(self.images)

    def check_label(self, lbl: np.ndarray, path: Path) -> None:
        k = self.num_classes
        if lbl.max() < k:
            return
        bad = np.unique(lbl[(lbl >= k) & (lbl != self.ignore_index)])
        if bad.size:
            raise SegpromptError(
                f"label '{path}' has values {bad.tolist()} outside {{0..{k - 1}, {self.ignore_index}}} "
                f"for {k} classes; re-run `segprompt prepare` (binary masks must be stored as 0/1, "
                f"not 0/255)")

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img = read_image(self.images[i])
        lbl = read_label(self.labels[i])
        if img.shape[:2] != lbl.shape:
            raise SegpromptError(
                f"image '{self.images[i]}' is {img.shape[1]}x{img.shape[0]} but its label '{self.labels[i]}' "
                f"is {lbl.shape[1]}x{lbl.shape[0]} (width x height); they must be equal")
        self.check_label(lbl, self.labels[i])
        return img, lbl

    def _load_or_skip(self, i: int) -> tuple[int, np.ndarray, np.ndarray, list[str]]:
        skipped: list[str] = []
        for j in range(len(self)):
            idx = (i + j) % len(self)
            try:
                img, lbl = self.load(idx)
                return idx, img, lbl, skipped
            except BadImage as e:
                if not self.skip_bad_images:
                    raise SegpromptError(f"{e}. Fix or remove it, or set data.skip_bad_images: true "
                                         f"to skip unreadable images") from None
                skipped.append(str(self.images[idx]))
        raise SegpromptError(f"no readable image in '{self.root / IMG_DIR / self.split}'")

    def __getitem__(self, item: Any) -> dict[str, Any]:
        if isinstance(item, tuple):  # training: (index, augmentation seed)
            i, seed = item
            idx, img, lbl, skipped = self._load_or_skip(i)
            img, lbl, view = self.train_transform(img, lbl, np.random.default_rng(seed), return_view=True)
            return {"img": to_tensor(img), "label": label_to_tensor(lbl), "stem": self.images[idx].stem,
                    "view": torch.tensor(view, dtype=torch.float32), "skipped": skipped}
        # Evaluation never substitutes another image for a bad one: that would count it twice.
        try:
            img, lbl = self.load(item)
        except BadImage as e:
            if not self.skip_bad_images:
                raise SegpromptError(f"{e}. Fix or remove it, or set data.skip_bad_images: true "
                                     f"to skip unreadable images") from None
            return {"img": None, "skipped": [str(self.images[item])]}
        if self.test_transform is not None:
            img = self.test_transform(img)
        return {"img": to_tensor(img), "label": label_to_tensor(lbl), "stem": self.images[item].stem,
                "path": str(self.images[item]), "view": identity_view(1)[0], "skipped": []}


def worker_init(_: int) -> None:
    """DataLoader workers: one OpenCV thread each, or the workers' thread pools fight for cores.

    A terminal's Ctrl-C (SIGINT) and Slurm's SIGTERM reach every process, but the main process
    stops training only at the next iteration boundary and needs its workers until then
    (docs/runs.md): workers ignore SIGINT, and obey SIGTERM only from the main process (the
    DataLoader ending them), which a thread tells apart by the sender's PID. For that no other
    thread may take SIGTERM: start the workers with :func:`start_workers`."""
    cv2.setNumThreads(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
        threading.Thread(target=_sigterm_from_parent_only, args=(os.getppid(),), daemon=True).start()


def start_workers(loader: DataLoader) -> Iterator:
    """``iter(loader)`` with SIGTERM blocked while its workers fork, so that every thread they have
    starts with it blocked, also those that libraries (OpenBLAS) re-create at fork before
    :func:`worker_init` runs."""
    if not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a SIGTERM meanwhile is delivered now


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(128 + signal.SIGTERM)


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, labels and views (B x 5); skipped (unreadable) items only contribute their file names."""
    skipped = [s for b in batch for s in b["skipped"]]
    batch = [b for b in batch if b["img"] is not None]
    if not batch:
        return {"img": None, "skipped": skipped}
    out: dict[str, Any] = {"img": torch.stack([b["img"] for b in batch]),
                           "label": torch.stack([b["label"] for b in batch]),
                           "stem": [b["stem"] for b in batch],
                           "skipped": skipped}
    if "path" in batch[0]:
        out["path"] = [b["path"] for b in batch]
    if all("view" in b for b in batch):
        out["view"] = torch.stack([b["view"] for b in batch])
    return out
