"""Retinal vessels (background, vessel): ``segprompt prepare chase_db1`` and ``segprompt prepare stare``.

``docs/datasets.md``, "CHASE-DB1 and STARE", following mmseg's ``chase_db1.py`` / ``stare.py``:

- CHASE-DB1: ``CHASEDB1.zip`` (flat: ``Image_01L.jpg`` ... ``Image_14R.jpg`` with ``_1stHO.png`` and
  ``_2ndHO.png``). Sorted by name, the first 20 images (01L-10R) are ``train``, the last 8 ``val``.
  Labels from the ``1stHO`` annotator (``--annotator 2ndHO`` for the other).
- STARE: ``stare-images.tar`` and ``labels-ah.tar`` (or ``labels-vk.tar``) whose members are gzipped
  ``.ppm.gz`` files. Sorted by name, the first 10 images are ``train``, the last 10 ``val``. Labels
  from the ``ah`` annotator (Hoover; ``--annotator vk`` for Kouznetsova).
- Images are decoded and written as PNG. Labels are channel 0 (of the BGR image, as mmcv reads it)
  ``// 128``, which also thresholds slightly non-binary masks, so vessels are stored as **{0, 1}**,
  never 0/255.

The SPM paper trains one-shot on these splits and reports foreground (vessel) Dice on ``val``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segprompt.data.meta import DatasetMeta
from segprompt.data.prepare.archive import ArchiveSpec, Source, match_members
from segprompt.data.prepare.labels import decode_image
from segprompt.data.prepare.runner import run, split_by_order
from segprompt.data.prepare.samples import Job, Plan, Progress, Sample, write_sample
from segprompt.errors import SegpromptError

CLASSES = ["background", "vessel"]
PALETTE = [[0, 0, 0], [255, 255, 255]]

CHASE_URL = "https://blogs.kingston.ac.uk/retinal/chasedb1/"
CHASE_ARCHIVES = (ArchiveSpec("dataset", ("CHASEDB1.zip",), r"(^|/)Image_\d\d[LR]\.jpg$", "Image_01L.jpg", CHASE_URL,
                              "28 images, each with the 1stHO and 2ndHO annotations: 84 files"),)
CHASE_ANNOTATORS = ("1stHO", "2ndHO")
CHASE_EXPECTED = {"train": 20, "val": 8}

STARE_URL = "https://cecas.clemson.edu/~ahoover/stare/probing/index.html"
STARE_IMAGES = ArchiveSpec("images", ("stare-images.tar",), r"(^|/)im\d{4}\.ppm(\.gz)?$", "im0001.ppm.gz", STARE_URL)
STARE_LABELS = {
    "ah": ArchiveSpec("labels", ("labels-ah.tar",), r"(^|/)im\d{4}\.ah\.ppm(\.gz)?$", "im0001.ah.ppm.gz", STARE_URL,
                      "the hand labels of A. Hoover"),
    "vk": ArchiveSpec("labels", ("labels-vk.tar",), r"(^|/)im\d{4}\.vk\.ppm(\.gz)?$", "im0001.vk.ppm.gz", STARE_URL,
                      "the hand labels of V. Kouznetsova"),
}
STARE_EXPECTED = {"train": 10, "val": 10}


def vessel_mask(data: bytes, where: str) -> np.ndarray:
    """mmseg's rule: channel 0 of the BGR-decoded annotation, ``// 128`` -> {0, 1}."""
    return decode_image(data, where)[:, :, 0] // 128


def _convert(root: Path, images: Source, img_member: str, labels: Source, lbl_member: str,
             sample: Sample) -> list[list[int]]:
    img = decode_image(images.read(img_member), images.where(img_member))
    label = vessel_mask(labels.read(lbl_member), labels.where(lbl_member))
    return [write_sample(root, sample, img, label, len(CLASSES),
                         f"{images.where(img_member)} / {labels.where(lbl_member)}")]


def _plan(name: str, images: Source, labels: Source, image_pattern: str, label_pattern: str, label_name: str,
          counts: dict[str, int], facts: dict) -> Plan:
    """One job per image; both patterns capture the shared name as ``stem`` (``label_name``: the
    label file's name with ``{stem}``, for messages)."""
    found = {m.group("stem"): member for member, m in match_members(images, image_pattern)}
    label_of: dict[str, str] = {}
    for member, m in match_members(labels, label_pattern):
        label_of.setdefault(m.group("stem"), member)
    split_of = split_by_order(list(found), counts, name)
    jobs, used_img, used_lbl = [], [], []
    for stem in sorted(found):
        member, lbl = found[stem], label_of.get(stem)
        if lbl is None:
            raise SegpromptError(f"{images.where(member)} has no label '{label_name.format(stem=stem)}' in "
                                 f"'{labels.path}': the archive is incomplete, or it is not the right one")
        sample = Sample(split_of[stem], stem, ".png")
        jobs.append(Job(_convert, (images, member, labels, lbl, sample), (sample,)))
        used_img.append(member)
        used_lbl.append(lbl)
    used: dict[str, list[str]] = {}
    used.setdefault(images.spec.role, []).extend(used_img)
    used.setdefault(labels.spec.role, []).extend(used_lbl)
    return Plan(name, CLASSES, PALETTE, jobs, used, facts=facts)


def prepare_chase_db1(src: Sequence[Path], out: Path, *, annotator: str = "1stHO",
                      expect_counts: dict[str, int] | None = None, nproc: int = 1, force: bool = False,
                      progress: Progress | None = None, log=None) -> DatasetMeta:
    if annotator not in CHASE_ANNOTATORS:
        raise SegpromptError(f"--annotator '{annotator}' is not a CHASE-DB1 annotator: {', '.join(CHASE_ANNOTATORS)}")
    counts = expect_counts or CHASE_EXPECTED

    def build_plan(sources: dict[str, Source]) -> Plan:
        source = sources["dataset"]
        if expect_counts is None:  # the official archive: every image has both annotations (84 files)
            members = set(source.members())
            for member, _ in match_members(source, r"(^|/)Image_\d\d[LR]\.jpg$"):
                for other in CHASE_ANNOTATORS:
                    if member[:-4] + f"_{other}.png" not in members:
                        raise SegpromptError(f"{source.where(member)} lacks its '{other}' annotation "
                                             f"'{member[:-4]}_{other}.png': the archive is incomplete ({CHASE_URL})")
        return _plan("chase_db1", source, source, r"(^|/)(?P<stem>Image_\d\d[LR])\.jpg$",
                     rf"(^|/)(?P<stem>Image_\d\d[LR])_{annotator}\.png$", "{stem}_" + annotator + ".png", counts,
                     {"annotator": annotator, "split_rule": "sorted names: first 20 images train, last 8 val",
                      "label_rule": "channel 0 // 128 -> {0, 1}"})

    options = {"annotator": annotator, "expect_counts": expect_counts}
    return run("chase_db1", CHASE_ARCHIVES, src, out, options, build_plan, counts,
               nproc=nproc, force=force, progress=progress, log=log)


def prepare_stare(src: Sequence[Path], out: Path, *, annotator: str = "ah", expect_counts: dict[str, int] | None = None,
                  nproc: int = 1, force: bool = False, progress: Progress | None = None, log=None) -> DatasetMeta:
    if annotator not in STARE_LABELS:
        raise SegpromptError(f"--annotator '{annotator}' is not a STARE annotator: {', '.join(STARE_LABELS)}")
    counts = expect_counts or STARE_EXPECTED

    def build_plan(sources: dict[str, Source]) -> Plan:
        return _plan("stare", sources["images"], sources["labels"], r"(^|/)(?P<stem>im\d{4})\.ppm(\.gz)?$",
                     rf"(^|/)(?P<stem>im\d{{4}})\.{annotator}\.ppm(\.gz)?$", "{stem}." + annotator + ".ppm.gz",
                     counts,
                     {"annotator": annotator, "split_rule": "sorted names: first 10 images train, last 10 val",
                      "label_rule": "channel 0 // 128 -> {0, 1}"})

    options = {"annotator": annotator, "expect_counts": expect_counts}
    return run("stare", (STARE_IMAGES, STARE_LABELS[annotator]), src, out, options, build_plan, counts,
               all_names=[n for s in (STARE_IMAGES, *STARE_LABELS.values()) for n in s.names],
               nproc=nproc, force=force, progress=progress, log=log)
