"""Image-recognition datasets of the SPM paper's appendix (Table 9): CIFAR-100, SVHN, Food-101.

They are read by torchvision's own dataset classes from files the user already has (nothing is
downloaded). ``data.root`` is the folder holding either the official archive or what it
extracts to; an archive that is present but not yet extracted is extracted there once.
A missing file gives an error naming it and where it is published.

Samples look like :class:`~segprompt.data.dataset.SegDataset`'s (``img`` a 3xHxW uint8 tensor,
``label`` a 0-d int64 tensor), so the same sampler, loop and evaluation serve both tasks.
Training augmentation is MAE/AdaptFormer's: RandomResizedCrop (area 0.08-1, bicubic) to
``data.train.crop_size`` and a horizontal flip with ``data.train.flip_prob``; testing resizes
to ``data.test.scale``. Each sample is augmented from its own seed, like the segmentation sets.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from segprompt.data.meta import DatasetMeta
from segprompt.data.transforms import to_tensor
from segprompt.errors import SegpromptError

# torchvision is imported inside the functions that read or augment: importing it pulls in
# torch._dynamo (seconds), and only the recognition appendix needs it (docs/cli.md, start-up time).


@dataclass(frozen=True)
class _Source:
    cls: str  # the torchvision.datasets class
    archive: str  # the official archive's name
    folder: str | None  # what the archive extracts to (None: the files themselves)
    files: tuple[str, ...]  # what torchvision reads, relative to the root
    url: str
    splits: tuple[str, ...]
    labels_attr: str  # the torchvision attribute holding every sample's class index


SOURCES = {
    "cifar100": _Source("CIFAR100", "cifar-100-python.tar.gz", "cifar-100-python",
                        ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
                        "https://www.cs.toronto.edu/~kriz/cifar.html", ("train", "test"), "targets"),
    "svhn": _Source("SVHN", "train_32x32.mat + test_32x32.mat", None, ("train_32x32.mat", "test_32x32.mat"),
                    "http://ufldl.stanford.edu/housenumbers/ (format 2, cropped digits)", ("train", "test"), "labels"),
    # Food101 keeps its labels in a private list; it is the only way to read them without
    # decoding 101k images.
    "food101": _Source("Food101", "food-101.tar.gz", "food-101",
                       ("food-101/meta/train.json", "food-101/meta/test.json", "food-101/images"),
                       "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/", ("train", "test"), "_labels"),
}
RECOGNITION_DATASETS = tuple(SOURCES)


def _check_files(name: str, root: Path) -> None:
    src = SOURCES[name]
    if src.folder is not None and not (root / src.folder).exists() and (root / src.archive).is_file():
        from torchvision.datasets.utils import extract_archive

        try:
            extract_archive(str(root / src.archive), str(root))
        except Exception as e:  # a truncated or wrong archive: any of tarfile's many errors
            raise SegpromptError(f"cannot extract '{root / src.archive}' ({e}); download it again from {src.url}") from e
    missing = [f for f in src.files if not (root / f).exists()]
    if missing:
        raise SegpromptError(
            f"{name}: '{root / missing[0]}' is missing ({len(missing)} of {len(src.files)} expected files). "
            f"Put the official {src.archive} (from {src.url}) into '{root}' "
            + ("(it is extracted there on first use) " if src.folder else "")
            + "or point data.root at the folder that holds it")


@functools.lru_cache(maxsize=8)
def open_torchvision(name: str, root: str | Path, split: str) -> Any:
    """torchvision's dataset object for ``split`` (train | test), from local files only. Cached:
    the meta, the class prior and the datasets of one run read each split once."""
    if name not in SOURCES:
        raise SegpromptError(f"unknown recognition dataset '{name}'; known: {', '.join(SOURCES)}")
    src, root = SOURCES[name], Path(root)
    if split not in src.splits:
        raise SegpromptError(f"{name} has splits {', '.join(src.splits)}, not '{split}' (data.train_split / "
                             f"data.val_split)")
    _check_files(name, root)
    from torchvision import datasets

    cls = getattr(datasets, src.cls)
    try:
        if name == "cifar100":
            return cls(str(root), train=split == "train", download=False)
        return cls(str(root), split=split, download=False)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted" (its MD5 check)
        raise SegpromptError(f"{name} in '{root}': {e}. The files fail torchvision's integrity check; "
                             f"download {src.archive} again from {src.url}") from e
    except ImportError as e:  # SVHN's .mat files need scipy
        raise SegpromptError(f"{name} needs {e.name} to read its files: pip install {e.name}") from e


def class_names(name: str, ds: Any) -> list[str]:
    if name == "svhn":
        return [str(i) for i in range(10)]
    return list(ds.classes)


def labels_of(name: str, ds: Any) -> np.ndarray:
    return np.asarray(getattr(ds, SOURCES[name].labels_attr), dtype=np.int64)


def recognition_meta(name: str, root: str | Path, splits: tuple[str, ...] = ("train", "test")) -> DatasetMeta:
    sets = {s: open_torchvision(name, root, s) for s in splits}
    classes = class_names(name, sets[splits[0]])
    return DatasetMeta(name=name, classes=classes, palette=[[0, 0, 0]] * len(classes), ignore_index=-100,
                       splits={s: len(ds) for s, ds in sets.items()},
                       extra={"task": "recognition", "source": SOURCES[name].archive})


def class_frequency(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """P0 of the recognition appendix: the category distribution of the training labels."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return (counts / max(counts.sum(), 1.0)).astype(np.float32)


class RecognitionDataset(Dataset):
    """Training items are ``(index, augmentation seed)`` pairs from the sampler; test items are indices."""

    task = "recognition"

    def __init__(self, name: str, root: str | Path, split: str, meta: DatasetMeta, *, train: bool,
                 crop_size: tuple[int, int] = (224, 224), flip_prob: float = 0.5,
                 test_size: tuple[int, int] = (224, 224), subset: int | None = None, subset_seed: int = 0):
        self.name, self.root, self.split, self.meta = name, Path(root), split, meta
        self.num_classes = meta.num_classes
        self.ignore_index = meta.ignore_index
        self.ds = open_torchvision(name, root, split)
        self.indices = np.arange(len(self.ds))
        if subset is not None:
            if not 1 <= subset <= len(self.ds):
                raise SegpromptError(f"data.train_subset {subset} is not in 1..{len(self.ds)} ({name} {split})")
            self.indices = np.sort(np.random.default_rng(subset_seed).choice(len(self.ds), subset, replace=False))
        self.labels = labels_of(name, self.ds)[self.indices]
        from torchvision.transforms import v2

        if train:
            self.transform = v2.Compose([
                v2.RandomResizedCrop(tuple(crop_size), scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
                v2.RandomHorizontalFlip(flip_prob)])
        else:
            self.transform = v2.Resize(tuple(test_size), interpolation=v2.InterpolationMode.BICUBIC)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: Any) -> dict[str, Any]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        idx = int(self.indices[i])
        img, label = self.ds[idx]
        if seed is None:
            img = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global generator
                torch.manual_seed(seed)
                img = self.transform(img)
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return {"img": to_tensor(arr), "label": torch.tensor(int(label), dtype=torch.int64),
                "stem": f"{self.split}_{idx:06d}", "skipped": []}
