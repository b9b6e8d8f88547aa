"""`ROOT/meta.json`: what every `segprompt prepare` writes beside the prepared images.

The prepared layout is ``ROOT/img_dir/<split>/<stem>.<ext>``, ``ROOT/ann_dir/<split>/<stem>.png``
(single-channel uint8 train IDs, 255 = ignore) and ``ROOT/meta.json``.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segprompt.errors import SegpromptError
from segprompt.io import atomic_write_json

META_FILE = "meta.json"
IMG_DIR = "img_dir"
ANN_DIR = "ann_dir"


@dataclass
class DatasetMeta:
    name: str
    classes: list[str]
    palette: list[list[int]]  # RGB per class
    ignore_index: int = 255
    splits: dict[str, int] = field(default_factory=dict)  # split -> number of samples
    label_values: dict[str, list[int]] = field(default_factory=dict)  # split -> values found
    extra: dict[str, Any] = field(default_factory=dict)  # converter-specific facts (sources, options)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def portable(self) -> dict[str, Any]:
        """What a trained model needs of its dataset away from it (stored in checkpoints and deltas):
        name, classes, palette and ignore index, without split counts or sources."""
        return {"name": self.name, "classes": list(self.classes), "palette": [list(c) for c in self.palette],
                "ignore_index": self.ignore_index}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_classes"] = self.num_classes
        return d


def shared_stem(paths: Iterable[Path]) -> tuple[Path, Path] | None:
    """The first two of ``paths`` with one stem (``a.jpg``, ``a.png``), or None: a stem names one
    sample, the same rule in prepare, train, eval and predict (docs/runs.md)."""
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            return seen[p.stem], p
        seen[p.stem] = p
    return None


def write_meta(root: str | Path, meta: DatasetMeta) -> None:
    if len(meta.palette) != len(meta.classes):
        raise ValueError(f"palette has {len(meta.palette)} colours for {len(meta.classes)} classes")
    atomic_write_json(Path(root) / META_FILE, meta.to_json())


def read_meta(root: str | Path, dataset: str = "DATASET") -> DatasetMeta:
    """Read ROOT/meta.json; a missing root names the `segprompt prepare` command that makes it."""
    root = Path(root)
    path = root / META_FILE
    if dataset == "folder":
        how = f"`segprompt prepare folder --images DIR --masks DIR --classes a,b,... --out {root}`"
    else:
        how = (f"`segprompt prepare {dataset} --out {root}`"
               + ("" if dataset == "synthetic" else " --src <folder with the official archives>")
               + f"; for your own images and masks, `segprompt prepare folder --images DIR --masks DIR "
               f"--classes a,b,... --out {root}` (README, \"Train on your own data\")")
    if not root.is_dir():
        raise SegpromptError(f"dataset root '{root}' does not exist. Create it with {how} "
                             f"(or point data.root at an existing prepared folder).")
    if not path.is_file():
        raise SegpromptError(f"'{path}' is missing: '{root}' is not a prepared dataset. Prepare it with {how}.")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SegpromptError(f"'{path}' is not valid JSON ({e}); re-run `segprompt prepare`.") from e
    d.pop("num_classes", None)
    try:
        return DatasetMeta(**d)
    except TypeError as e:
        raise SegpromptError(f"'{path}' does not have the fields segprompt writes: {e}") from e


def golden_palette(n: int, saturation: float = 0.75, phase: int = 0) -> list[list[int]]:
    """``n`` distinct display colours for datasets that define none: hues ``i * 0.618`` apart (the
    golden ratio keeps any prefix spread out), alternately bright and dark (``phase`` picks which
    comes first)."""
    return [[round(255 * v) for v in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, saturation,
                                                        0.95 if (i + phase) % 2 else 0.7)]
            for i in range(n)]


def check_num_classes(declared: int | None, meta: DatasetMeta, where: Path | str) -> None:
    """A recipe's ``data.num_classes`` (None: not set) must agree with the dataset's ``meta.json``."""
    if declared is not None and declared != meta.num_classes:
        raise SegpromptError(f"data.num_classes is {declared} but '{where}' lists {meta.num_classes} classes; "
                             f"point data.root at the right dataset")

