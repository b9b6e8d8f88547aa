"""ADE20K SceneParsing (150 classes): ``segprompt prepare ade20k``.

``docs/datasets.md``, "ADE20K". From ``ADEChallengeData2016.zip``: ``images/{training,validation}``
JPEGs are copied byte for byte; ``annotations`` PNGs hold 0..150 with 0 = "other objects" (not
evaluated). The zero label is reduced here, exactly once (mmseg's ``reduce_zero_label``): 0 -> 255,
v -> v - 1, so train IDs are 0..149 and training never shifts labels again. A value above 150 is an
error. Class names come from the archive's ``objectInfo150.txt`` (first synonym of each entry).
Splits: train 20,210 / val 2,000; ``release_test.zip`` has no labels and is not used.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

from segprompt.data.meta import DatasetMeta, golden_palette
from segprompt.data.prepare.archive import ArchiveSpec, Source, match_members
from segprompt.data.prepare.labels import apply_lut, decode_index, value_lut
from segprompt.data.prepare.runner import run
from segprompt.data.prepare.samples import Job, Plan, Progress, Sample, write_sample
from segprompt.errors import SegpromptError

NAME = "ade20k"
URL = ("http://sceneparsing.csail.mit.edu/ "
       "(file: http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip)")
ARCHIVES = (ArchiveSpec("dataset", ("ADEChallengeData2016.zip",), r"(^|/)annotations/training/[^/]+\.png$",
                        "ADEChallengeData2016/annotations/training/ADE_train_00000001.png", URL),)
EXPECTED = {"train": 20210, "val": 2000}
NUM_CLASSES = 150
SPLITS = {"training": "train", "validation": "val"}
# reduce_zero_label, applied once: 0 -> 255, v -> v - 1; values above 150 are not ADE20K labels
LUT = value_lut({v: v - 1 for v in range(1, NUM_CLASSES + 1)}, [0])


def read_class_names(source: Source, member: str) -> list[str]:
    """The 150 names of ``objectInfo150.txt`` (``Idx Ratio Train Val Name`` rows, tab- or comma-
    separated), first synonym of each (``building;edifice`` -> ``building``)."""
    names: dict[int, str] = {}
    for line in source.read(member).decode("utf-8", "replace").splitlines():
        fields = line.split("\t") if "\t" in line else next(csv.reader([line]), [])
        if len(fields) < 5 or not fields[0].strip().isdigit():
            continue  # header or blank line
        names[int(fields[0])] = re.split(r"[;,]", fields[-1])[0].strip()
    if sorted(names) != list(range(1, NUM_CLASSES + 1)):
        raise SegpromptError(f"{source.where(member)} does not list the classes 1..150 "
                             f"(found {len(names)} entries): the archive is damaged or not ADEChallengeData2016")
    return [names[i] for i in range(1, NUM_CLASSES + 1)]


def _convert(root: Path, source: Source, img_member: str, lbl_member: str, sample: Sample) -> list[list[int]]:
    where = source.where(lbl_member)
    label = apply_lut(decode_index(source.read(lbl_member), where), LUT, where, "ADE20K labels (0..150)")
    return [write_sample(root, sample, source.read(img_member), label, NUM_CLASSES,
                         f"{source.where(img_member)} / {where}")]


def build_plan(sources: dict[str, Source]) -> Plan:
    source = sources["dataset"]
    info = [m for m, _ in match_members(source, r"(^|/)objectInfo150\.txt$")]
    if not info:
        raise SegpromptError(f"'{source.path}' lacks 'ADEChallengeData2016/objectInfo150.txt' (the class names): "
                             f"the archive is incomplete; get it again from {URL}")
    classes = read_class_names(source, info[0])
    labels = {(m.group(2), m.group(3)): member for member, m in
              match_members(source, r"(^|/)annotations/(training|validation)/([^/]+)\.png$")}
    jobs, used = [], [info[0]]
    for member, m in match_members(source, r"(^|/)images/(training|validation)/([^/]+)\.jpg$"):
        folder, stem = m.group(2), m.group(3)
        lbl = labels.pop((folder, stem), None)
        if lbl is None:
            raise SegpromptError(f"{source.where(member)} has no annotation 'annotations/{folder}/{stem}.png': "
                                 f"the archive is incomplete (get it again from {URL})")
        sample = Sample(SPLITS[folder], stem, ".jpg")
        jobs.append(Job(_convert, (source, member, lbl, sample), (sample,)))
        used += [member, lbl]
    if labels:
        (folder, stem), member = sorted(labels.items())[0]
        raise SegpromptError(f"{source.where(member)} has no image 'images/{folder}/{stem}.jpg': "
                             f"the archive is incomplete (get it again from {URL})")
    return Plan(NAME, classes, golden_palette(NUM_CLASSES), jobs, {"dataset": used},
                facts={"reduce_zero_label": "applied once at prepare time: 0 -> 255, v -> v-1 (add 1 back "
                                            "for server submissions)"})


def prepare(src: Sequence[Path], out: Path, *, expect_counts: dict[str, int] | None = None, nproc: int = 1,
            force: bool = False, progress: Progress | None = None, log=None) -> DatasetMeta:
    options = {"reduce_zero_label": True, "expect_counts": expect_counts}
    return run(NAME, ARCHIVES, src, out, options, build_plan, expect_counts or EXPECTED,
               nproc=nproc, force=force, progress=progress, log=log)
