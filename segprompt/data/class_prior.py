"""Per-pixel class prior of a training split: M0 of the SPM paper (Section 3.1, Eq. 1).

``M0(x, y, c)`` is the fraction of training labels whose (resized) pixel (x, y) is class ``c``.
Labels are resized with nearest neighbour to ``res x res``; ignored pixels are not counted, and a
position no label covers gets the uniform distribution, so every pixel sums to 1. The result is
computed once and cached: ``segprompt prepare`` writes the train split's into the prepared layout
(``ROOT/class_prior/``), and training reads it there; any other (a subset, another resolution) is
cached in the user's cache folder (:func:`user_cache_dir`), keyed by the dataset's ``meta.json``,
because training never writes into a dataset folder (it may be read-only or shared).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import cv2
import numpy as np

from segprompt.errors import SegpromptError
from segprompt.io import atomic_write_bytes


def compute_class_prior(label_paths: list[Path], num_classes: int, ignore_index: int = 255,
                        res: int = 64) -> np.ndarray:
    counts = np.zeros((num_classes, res * res), np.float64)
    pix = np.arange(res * res)
    for path in label_paths:
        lbl = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if lbl is None:
            raise SegpromptError(f"cannot read label '{path}' to compute the class prior")
        small = cv2.resize(lbl, (res, res), interpolation=cv2.INTER_NEAREST).reshape(-1)
        valid = (small != ignore_index) & (small < num_classes)
        np.add.at(counts, (small[valid].astype(np.int64), pix[valid]), 1.0)
    total = counts.sum(0, keepdims=True)
    prior = np.where(total > 0, counts / np.maximum(total, 1), 1.0 / num_classes)
    return prior.reshape(num_classes, res, res).astype(np.float32)


def prior_cache_path(root: Path, label_paths: list[Path], num_classes: int, res: int) -> Path:
    """Where :func:`cached_class_prior` keeps the prior of these label files: named by the set of
    their names, so another split or subset gets its own file."""
    key = hashlib.sha256("\n".join(sorted(p.name for p in label_paths)).encode()).hexdigest()[:16]
    return Path(root) / "class_prior" / f"prior_k{num_classes}_r{res}_{key}.npy"


def user_cache_dir() -> Path:
    """``$SEGPROMPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/segprompt``, else ``~/.cache/segprompt``."""
    if os.environ.get("SEGPROMPT_CACHE_DIR"):
        return Path(os.environ["SEGPROMPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segprompt"


def training_prior_cache(root: Path) -> Path:
    """Where training caches the priors of the dataset at ``root``: the user cache, in a folder named
    by the hash of the dataset's ``meta.json`` (another dataset, or this one prepared again, gets
    another folder)."""
    meta = Path(root) / "meta.json"
    key = hashlib.sha256(meta.read_bytes() if meta.is_file() else str(Path(root).resolve()).encode()).hexdigest()
    return user_cache_dir() / "class_prior" / key[:16]


def cached_class_prior(root: Path, label_paths: list[Path], num_classes: int, ignore_index: int = 255,
                       res: int = 64, cache_root: Path | None = None) -> np.ndarray:
    """:func:`compute_class_prior`, cached by the set of label files: read from ``root/class_prior/``
    (what ``prepare`` wrote) or ``cache_root/class_prior/``, and written to ``cache_root`` (default
    ``root``: ``prepare`` writes into the dataset it makes; training passes the user cache)."""
    cache_root = Path(root) if cache_root is None else Path(cache_root)
    for folder in dict.fromkeys((Path(root), cache_root)):
        cache = prior_cache_path(folder, label_paths, num_classes, res)
        if cache.is_file():
            prior = np.load(cache)
            if prior.shape == (num_classes, res, res):
                return prior
    cache = prior_cache_path(cache_root, label_paths, num_classes, res)
    prior = compute_class_prior(label_paths, num_classes, ignore_index, res)
    try:

        buf = io.BytesIO()
        np.save(buf, prior)
        atomic_write_bytes(cache, buf.getvalue())
    except OSError:
        pass  # a read-only cache folder: recompute next time
    return prior
