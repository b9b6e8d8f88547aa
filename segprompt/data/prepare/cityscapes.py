"""Cityscapes (19 classes): ``segprompt prepare cityscapes``.

``docs/datasets.md``, "Cityscapes": the shipped ``*_gtFine_labelIds.png`` are mapped to the 19
trainIds through a 256-entry lookup table (cityscapesScripts ``helpers/labels.py``); every other
labelId becomes 255. Polygons are not re-rendered: the official evaluator reads exactly these files.
Images are copied byte for byte. Splits: train (2975) and val (500); the test split is left out
because its gtFine holds only ego-vehicle and rectification-border labels (nothing to train or
evaluate on).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from segprompt.data.meta import DatasetMeta
from segprompt.data.prepare.archive import ArchiveSpec, Source, match_members
from segprompt.data.prepare.labels import apply_lut, decode_index, value_lut
from segprompt.data.prepare.runner import run
from segprompt.data.prepare.samples import Job, Plan, Progress, Sample, write_sample
from segprompt.errors import SegpromptError

NAME = "cityscapes"
URL = "https://www.cityscapes-dataset.com/downloads/"
ARCHIVES = (
    ArchiveSpec("images", ("leftImg8bit_trainvaltest.zip",),
                r"(^|/)leftImg8bit/(train|val|test)/[^/]+/[^/]+_leftImg8bit\.png$",
                "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png", URL,
                "free account required; about 11 GB"),
    ArchiveSpec("labels", ("gtFine_trainvaltest.zip",),
                r"(^|/)gtFine/(train|val|test)/[^/]+/[^/]+_gtFine_labelIds\.png$",
                "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", URL,
                "free account required; about 241 MB"),
)
EXPECTED = {"train": 2975, "val": 500}

# (class, labelId) in trainId order, from cityscapesScripts helpers/labels.py
CLASSES_AND_LABEL_IDS = (
    ("road", 7), ("sidewalk", 8), ("building", 11), ("wall", 12), ("fence", 13), ("pole", 17),
    ("traffic light", 19), ("traffic sign", 20), ("vegetation", 21), ("terrain", 22), ("sky", 23),
    ("person", 24), ("rider", 25), ("car", 26), ("truck", 27), ("bus", 28), ("train", 31),
    ("motorcycle", 32), ("bicycle", 33),
)
CLASSES = [c for c, _ in CLASSES_AND_LABEL_IDS]
# the official evaluator's categories over the 19 train classes (cityscapesScripts labels.py);
# recorded in meta.json, so `segprompt eval` reports their IoU (the STDC paper's Table 8)
CATEGORIES = {
    "flat": ["road", "sidewalk"],
    "construction": ["building", "wall", "fence"],
    "object": ["pole", "traffic light", "traffic sign"],
    "nature": ["vegetation", "terrain"],
    "sky": ["sky"],
    "human": ["person", "rider"],
    "vehicle": ["car", "truck", "bus", "train", "motorcycle", "bicycle"],
}
LABEL_TO_TRAIN = {label_id: train_id for train_id, (_, label_id) in enumerate(CLASSES_AND_LABEL_IDS)}
NUM_LABEL_IDS = 34  # labelIds 0..33 are drawn; -1 (license plate) is never rendered
PALETTE = [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
           [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
           [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32]]
LUT = value_lut(LABEL_TO_TRAIN, range(NUM_LABEL_IDS))
SPLITS = ("train", "val")


def _convert(root: Path, images: Source, img_member: str, labels: Source, lbl_member: str,
             sample: Sample) -> list[list[int]]:
    where = labels.where(lbl_member)
    label = apply_lut(decode_index(labels.read(lbl_member), where), LUT, where, "Cityscapes labelIds (0..33)")
    return [write_sample(root, sample, images.read(img_member), label, len(CLASSES),
                         f"{images.where(img_member)} / {where}")]


def build_plan(sources: dict[str, Source]) -> Plan:
    images, labels = sources["images"], sources["labels"]
    pattern = r"(^|/)leftImg8bit/({})/([^/]+)/([^/]+)_leftImg8bit\.png$".format("|".join(SPLITS))
    found_labels = {(m.group(2), m.group(4)): member for member, m in match_members(
        labels, r"(^|/)gtFine/({})/([^/]+)/([^/]+)_gtFine_labelIds\.png$".format("|".join(SPLITS)))}
    jobs, used_img, used_lbl = [], [], []
    for member, m in match_members(images, pattern):
        split, city, stem = m.group(2), m.group(3), m.group(4)
        lbl = found_labels.pop((split, stem), None)
        if lbl is None:
            raise SegpromptError(
                f"{images.where(member)} has no label: '{labels.path}' lacks "
                f"'gtFine/{split}/{city}/{stem}_gtFine_labelIds.png'. Is '{labels.path.name}' the complete "
                f"gtFine_trainvaltest.zip (from {URL})?")
        sample = Sample(split, stem, ".png")
        jobs.append(Job(_convert, (images, member, labels, lbl, sample), (sample,)))
        used_img.append(member)
        used_lbl.append(lbl)
    if found_labels:
        (split, stem), member = sorted(found_labels.items())[0]
        raise SegpromptError(f"{labels.where(member)} has no image in '{images.path}' "
                             f"(leftImg8bit/{split}/.../{stem}_leftImg8bit.png): is the images archive complete?")
    return Plan(NAME, CLASSES, PALETTE, jobs, {"images": used_img, "labels": used_lbl},
                facts={"label_map": {"from": "gtFine labelIds", "labelId_to_trainId": {
                    str(k): int(LUT[k]) for k in range(NUM_LABEL_IDS)}},
                    "left_out": "the test split (its gtFine has no class labels)",
                    "categories": CATEGORIES})


def prepare(src: Sequence[Path], out: Path, *, expect_counts: dict[str, int] | None = None, nproc: int = 1,
            force: bool = False, progress: Progress | None = None, log=None) -> DatasetMeta:
    options = {"label_source": "gtFine_labelIds", "expect_counts": expect_counts}
    return run(NAME, ARCHIVES, src, out, options, build_plan, expect_counts or EXPECTED,
               nproc=nproc, force=force, progress=progress, log=log)
