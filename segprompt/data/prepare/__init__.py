"""`segprompt prepare DATASET` for the real datasets (``docs/datasets.md``): one module per dataset.

Each module turns the official archives (or an extracted copy) into the prepared layout
(``img_dir/<split>/``, ``ann_dir/<split>/``, ``meta.json``) with the shared machinery:
:mod:`.archive` (reading the official archives), :mod:`.labels` (decoding, label remapping),
:mod:`.samples` (what a converter plans; per-sample write and verification), :mod:`.runner`
(parallel atomic conversion, ``meta.json`` with sources, options, counts, label values and the
train-split class prior) and :mod:`.check` (re-verifying a prepared folder).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from segprompt.data.meta import DatasetMeta
from segprompt.data.prepare import ade20k, camvid, cityscapes, retinal, vaihingen
from segprompt.data.prepare.check import check
from segprompt.data.prepare.runner import parse_counts
from segprompt.data.prepare.samples import Progress
from segprompt.errors import SegpromptError

# dataset -> (its prepare function, the dataset-specific options it takes)
DATASETS: dict[str, tuple[Callable[..., DatasetMeta], tuple[str, ...]]] = {
    "cityscapes": (cityscapes.prepare, ()),
    "camvid": (camvid.prepare, ("layout",)),
    "ade20k": (ade20k.prepare, ()),
    "vaihingen": (vaihingen.prepare, ("tiling", "tile_size", "tile_stride")),
    "chase_db1": (retinal.prepare_chase_db1, ("annotator",)),
    "stare": (retinal.prepare_stare, ("annotator",)),
}


def prepare(dataset: str, src: Sequence[Path], out: Path, *, expect_counts: dict[str, int] | None = None,
            nproc: int = 1, force: bool = False, progress: Progress | None = None,
            log: Callable[[str], None] | None = None, **options: Any) -> DatasetMeta:
    """Convert ``dataset``'s archives in ``src`` to ``out``. ``options`` left None take their defaults;
    one that does not apply to ``dataset`` is an error."""
    if dataset not in DATASETS:
        raise SegpromptError(f"unknown dataset '{dataset}'; real datasets: {', '.join(DATASETS)}")
    fn, allowed = DATASETS[dataset]
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in allowed:
            users = [d for d, (_, opts) in DATASETS.items() if key in opts]
            raise SegpromptError(f"--{key.replace('_', '-')} does not apply to {dataset}"
                                 + (f" (only to {', '.join(users)})" if users else ""))
    return fn([Path(p) for p in src], Path(out), expect_counts=expect_counts, nproc=nproc, force=force,
              progress=progress, log=log, **given)


__all__ = ["DATASETS", "prepare", "check", "parse_counts"]
