"""ISPRS Vaihingen (6 classes incl. clutter): ``segprompt prepare vaihingen [--tiling mmseg|true-stride]``.

``docs/datasets.md``, "ISPRS Vaihingen", following mmseg ``tools/dataset_converters/vaihingen.py``:

- Archives are chosen **by name**: the IRRG tiles ``top/top_mosaic_09cm_area<N>.tif`` from
  ``ISPRS_semantic_labeling_Vaihingen.zip`` and the eroded labels ``..._noBoundary.tif`` from
  ``ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip``. A non-eroded GT zip lying
  beside them is never read; ground truth of areas outside the split (area 9) is left out.
- Labels: the **RGB** colour table below (mmseg writes it in BGR because cv2 reads BGR; here every
  label is converted to RGB before the lookup, so the reading library cannot swap building <-> clutter
  or low vegetation <-> car). Black boundary pixels -> 255, classes after mmseg's reduce-zero-label;
  any other colour is an error. Images keep their IRRG channels.
- Tiling ``mmseg`` (default) reproduces mmseg's arithmetic (open-mmlab/mmsegmentation#2811): the
  row/column counts come from the stride but box origins advance by the tile size, boxes past the
  border are shifted back, duplicates collapse: 344 train / 398 val tiles of 512. ``true-stride``
  advances by the stride (1046 / 1208). Tiles are named ``area<N>_<x0>_<y0>_<x1>_<y1>.png``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from segprompt.data.meta import DatasetMeta
from segprompt.data.prepare.archive import ArchiveSpec, Source, match_members
from segprompt.data.prepare.labels import apply_colour_table, decode_image, decode_rgb
from segprompt.data.prepare.runner import run
from segprompt.data.prepare.samples import Job, Plan, Progress, Sample, write_sample
from segprompt.errors import SegpromptError

NAME = "vaihingen"
URL = "https://www.isprs.org/education/benchmarks/UrbanSemLab/2d-sem-label-vaihingen.aspx"
HOW = "ISPRS 2D semantic labeling benchmark: the files are sent on request (data request form on that page)"
ARCHIVES = (
    ArchiveSpec("images", ("ISPRS_semantic_labeling_Vaihingen.zip",), r"(^|/)top/top_mosaic_09cm_area\d+\.tif$",
                "top/top_mosaic_09cm_area1.tif", URL, HOW),
    ArchiveSpec("labels", ("ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip",),
                r"(^|/)top_mosaic_09cm_area\d+_noBoundary\.tif$", "top_mosaic_09cm_area1_noBoundary.tif", URL, HOW),
)
TRAIN_AREAS = (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)
VAL_AREAS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)
CLASSES = ["impervious_surface", "building", "low_vegetation", "tree", "car", "clutter"]
# RGB colour -> train ID (black = eroded class boundaries -> ignore)
COLOUR_TABLE = {(255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3, (255, 255, 0): 4,
                (255, 0, 0): 5, (0, 0, 0): 255}
PALETTE = [[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]]
TILINGS = ("mmseg", "true-stride")
OFFICIAL_TILES = {("mmseg", 512, 256): {"train": 344, "val": 398},
                  ("true-stride", 512, 256): {"train": 1046, "val": 1208}}


def tile_starts(length: int, size: int, stride: int, tiling: str) -> list[int]:
    """Tile origins along one axis of ``length`` pixels (sorted, distinct)."""
    if length < size:
        raise SegpromptError(f"a {length}-pixel side is shorter than the tile size {size}; pass a smaller "
                             f"--tile-size")
    n = math.ceil((length - size) / stride)
    if n * stride + size < length:
        n += 1
    step = size if tiling == "mmseg" else stride  # mmseg advances by the tile size (#2811)
    return sorted({min(i * step, length - size) for i in range(n + 1)})  # shifted back at the border


def tile_boxes(height: int, width: int, size: int = 512, stride: int = 256,
               tiling: str = "mmseg") -> list[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` boxes of every tile of a ``height`` x ``width`` image, row by row."""
    if tiling not in TILINGS:
        raise SegpromptError(f"--tiling '{tiling}' is not one of: {', '.join(TILINGS)}")
    return [(x, y, x + size, y + size) for y in tile_starts(height, size, stride, tiling)
            for x in tile_starts(width, size, stride, tiling)]


def _convert_area(root: Path, images: Source, img_member: str, labels: Source, lbl_member: str,
                  samples: tuple[Sample, ...], boxes: tuple[tuple[int, int, int, int], ...]) -> list[list[int]]:
    img = decode_image(images.read(img_member), images.where(img_member))  # BGR; IRRG order kept on write
    where = labels.where(lbl_member)
    label = apply_colour_table(decode_rgb(labels.read(lbl_member), where), COLOUR_TABLE, where)
    if img.shape[:2] != label.shape:
        raise SegpromptError(f"{images.where(img_member)} is {img.shape[1]}x{img.shape[0]} but {where} is "
                             f"{label.shape[1]}x{label.shape[0]}; they must be equal")
    return [write_sample(root, s, img[y0:y1, x0:x1], label[y0:y1, x0:x1], len(CLASSES), f"{where} tile {s.stem}")
            for s, (x0, y0, x1, y1) in zip(samples, boxes, strict=True)]


def build_plan(sources: dict[str, Source], tiling: str, size: int, stride: int, all_areas: bool) -> Plan:
    images, labels = sources["images"], sources["labels"]
    img_members = {int(m.group(2)): member for member, m in
                   match_members(images, r"(^|/)top/top_mosaic_09cm_area(\d+)\.tif$")}
    lbl_members = {int(m.group(2)): member for member, m in
                   match_members(labels, r"(^|/)top_mosaic_09cm_area(\d+)_noBoundary\.tif$")}
    split_of = {a: "train" for a in TRAIN_AREAS} | {a: "val" for a in VAL_AREAS}
    if all_areas:
        missing = sorted(set(split_of) - set(img_members))
        if missing:
            raise SegpromptError(f"'{images.path}' lacks the tiles of areas {missing} "
                                 f"(top/top_mosaic_09cm_area<N>.tif): "
                                 f"the archive is incomplete (see {URL}); pass --expect-counts to convert a subset")
    jobs, used_img, used_lbl = [], [], []
    for area in sorted(a for a in img_members if a in split_of):
        img_member, lbl_member = img_members[area], lbl_members.get(area)
        if lbl_member is None:
            raise SegpromptError(f"{images.where(img_member)} has no eroded ground truth: "
                                 f"'{labels.path}' lacks 'top_mosaic_09cm_area{area}_noBoundary.tif'")
        # Tile boxes need the size: read it from the label (both must agree, checked in the job).
        h, w = decode_image(labels.read(lbl_member), labels.where(lbl_member)).shape[:2]
        boxes = tuple(tile_boxes(h, w, size, stride, tiling))
        samples = tuple(Sample(split_of[area], f"area{area}_{x0}_{y0}_{x1}_{y1}", ".png") for x0, y0, x1, y1 in boxes)
        jobs.append(Job(_convert_area, (images, img_member, labels, lbl_member, samples, boxes), samples))
        used_img.append(img_member)
        used_lbl.append(lbl_member)
    left_out = sorted({lbl_members[a] for a in lbl_members if a not in split_of}
                      | {img_members[a] for a in img_members if a not in split_of})
    return Plan(NAME, CLASSES, PALETTE, jobs, {"images": used_img, "labels": used_lbl},
                facts={"colour_table_rgb": {f"{r},{g},{b}": v for (r, g, b), v in COLOUR_TABLE.items()},
                       "channels": "IRRG (near-infrared, red, green), kept as they are",
                       "tiling": {"mode": tiling, "size": size, "stride": stride},
                       "areas": {"train": list(TRAIN_AREAS), "val": list(VAL_AREAS)},
                       "left_out": left_out})


def prepare(src: Sequence[Path], out: Path, *, tiling: str = "mmseg", tile_size: int = 512, tile_stride: int = 256,
            expect_counts: dict[str, int] | None = None, nproc: int = 1, force: bool = False,
            progress: Progress | None = None, log=None) -> DatasetMeta:
    if tiling not in TILINGS:
        raise SegpromptError(f"--tiling '{tiling}' is not one of: {', '.join(TILINGS)}")
    if tile_size < 1 or not 1 <= tile_stride <= tile_size:
        raise SegpromptError(f"--tile-size {tile_size} / --tile-stride {tile_stride}: need 1 <= stride <= size")
    options = {"tiling": tiling, "tile_size": tile_size, "tile_stride": tile_stride, "expect_counts": expect_counts}
    expected = expect_counts or OFFICIAL_TILES.get((tiling, tile_size, tile_stride))
    return run(NAME, ARCHIVES, src, out, options,
               lambda s: build_plan(s, tiling, tile_size, tile_stride, all_areas=expect_counts is None),
               expected, nproc=nproc, force=force, progress=progress, log=log)
