"""`segprompt prepare` for real datasets: reruns, --force, interruption, bad archives, --check, the CLI,
parallel workers, and the output feeding `segprompt train`."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli, write_recipe
from faults import dead_pid
from test_prepare import (
    make_ade20k,
    make_chase_db1,
    make_cityscapes,
    make_vaihingen,
    png,
    vaihingen_counts,
    write_tar,
    write_zip,
)

from segprompt.data.meta import read_meta
from segprompt.data.prepare import check, prepare
from segprompt.errors import SegpromptError
from segprompt.io import sha256_file, temp_prefix

CHASE_COUNTS = {"train": 2, "val": 1}


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def chase(tmp_path: Path, out: Path, **kw):
    return prepare("chase_db1", [tmp_path / "src"], out, expect_counts=CHASE_COUNTS, **kw)


def test_rerun_is_a_no_op_other_options_are_refused_and_force_moves_the_old_folder_aside(tmp_path):
    make_chase_db1(tmp_path / "src")
    out = tmp_path / "chase"
    meta = chase(tmp_path, out)
    before = digest(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert chase(tmp_path, out) == meta
    assert digest(out) == before and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    with pytest.raises(SegpromptError, match="other options.*--force"):
        chase(tmp_path, out, annotator="2ndHO")
    assert digest(out) == before
    chase(tmp_path, out, annotator="2ndHO", force=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("chase.old-")]
    assert len(aside) == 1 and digest(aside[0]) == before  # the old folder is kept whole
    assert read_meta(out, "chase_db1").extra["options"]["annotator"] == "2ndHO"


def test_out_folder_with_foreign_files_is_never_written_into(tmp_path):
    make_chase_db1(tmp_path / "src")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(SegpromptError, match="did not write"):
        chase(tmp_path, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_interrupted_conversion_resumes_and_ends_identical(tmp_path):
    make_vaihingen(tmp_path / "src")
    counts = vaihingen_counts(16, 8, "mmseg")
    kw = dict(tile_size=16, tile_stride=8, expect_counts=counts)
    reference = tmp_path / "reference"
    prepare("vaihingen", [tmp_path / "src"], reference, **kw)

    def interrupt(stage, done, total):
        if stage == "converting" and done == 1:
            raise KeyboardInterrupt  # as Ctrl-C after the first area

    out = tmp_path / "vaihingen"
    with pytest.raises(KeyboardInterrupt):
        prepare("vaihingen", [tmp_path / "src"], out, progress=interrupt, **kw)
    assert not (out / "meta.json").exists() and (out / ".segprompt-prepare.json").exists()
    with pytest.raises(SegpromptError, match="meta.json"):  # training refuses an unfinished folder
        read_meta(out, "vaihingen")
    written = sorted((out / "ann_dir").rglob("*.png"))
    assert 0 < len(written) < sum(counts.values())
    # what a kill mid-write leaves: a temporary named after a process that is gone
    stale = out / "img_dir" / "val" / f"{temp_prefix('area2_0_0_16_16.png', pid=dead_pid())}k3j2.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\x89PNG half")
    kept = {p: p.stat().st_mtime_ns for p in written}
    with pytest.raises(SegpromptError, match="other options"):
        prepare("vaihingen", [tmp_path / "src"], out, tiling="true-stride", **kw)
    prepare("vaihingen", [tmp_path / "src"], out, **kw)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished files were skipped
    assert not stale.exists()
    assert digest(out) == digest(reference)  # byte for byte, meta.json included


def test_files_lost_after_a_finished_conversion_are_redone(tmp_path):
    make_chase_db1(tmp_path / "src")
    out = tmp_path / "chase"
    chase(tmp_path, out)
    before = digest(out)
    (out / "ann_dir" / "train" / "Image_01R.png").unlink()
    chase(tmp_path, out)
    assert digest(out) == before


@pytest.mark.parametrize("dataset, archive, url", [
    ("cityscapes", "leftImg8bit_trainvaltest.zip", "https://www.cityscapes-dataset.com/downloads/"),
    ("ade20k", "ADEChallengeData2016.zip", "sceneparsing.csail.mit.edu"),
    ("vaihingen", "ISPRS_semantic_labeling_Vaihingen.zip", "isprs.org"),
    ("camvid", "camvid.zip", "kaggle.com/datasets/carlolepelaars/camvid"),
    ("chase_db1", "CHASEDB1.zip", "kingston.ac.uk"),
    ("stare", "stare-images.tar", "clemson.edu/~ahoover/stare"),
])
def test_missing_archive_is_named_with_its_publisher(tmp_path, dataset, archive, url):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegpromptError) as e:
        prepare(dataset, [tmp_path / "empty"], tmp_path / "out")
    assert f"'{archive}'" in str(e.value) and url in str(e.value) and "never downloads" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_wrong_archive_is_refused(tmp_path):
    make_cityscapes(tmp_path / "src")
    wrong = "gtFine_trainvaltest.zip' is not an archive chase_db1 uses; it needs 'CHASEDB1.zip'"
    with pytest.raises(SegpromptError, match=wrong):
        prepare("chase_db1", [tmp_path / "src" / "gtFine_trainvaltest.zip"], tmp_path / "out")
    # the right name on the wrong content
    (tmp_path / "src" / "gtFine_trainvaltest.zip").rename(tmp_path / "src" / "CHASEDB1.zip")
    with pytest.raises(SegpromptError, match="holds no member like 'Image_01L.jpg'"):
        prepare("chase_db1", [tmp_path / "src"], tmp_path / "out")
    # only the eroded ground truth is read: the full-GT zip alone does not stand in for it
    make_vaihingen(tmp_path / "isprs")
    (tmp_path / "isprs" / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip").unlink()
    with pytest.raises(SegpromptError, match="ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip"):
        prepare("vaihingen", [tmp_path / "isprs"], tmp_path / "out2", tile_size=16, tile_stride=8,
                expect_counts=vaihingen_counts(16, 8, "mmseg"))


def test_corrupt_and_missing_archive_members_are_clear_errors(tmp_path):
    make_chase_db1(tmp_path / "src")
    zpath = tmp_path / "src" / "CHASEDB1.zip"
    # A damaged member: flip bytes inside its compressed data, so its CRC fails.
    data = bytearray(zpath.read_bytes())
    with zipfile.ZipFile(zpath) as z:
        info = z.getinfo("Image_01R_1stHO.png")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 5, start + 15):
        data[i] ^= 0xFF
    zpath.write_bytes(bytes(data))
    with pytest.raises(SegpromptError) as e:
        chase(tmp_path, tmp_path / "out")
    assert "'Image_01R_1stHO.png'" in str(e.value) and str(zpath) in str(e.value) and "damaged" in str(e.value)
    # A truncated download.
    zpath.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SegpromptError, match="not a readable zip archive.*download 'CHASEDB1.zip' again"):
        chase(tmp_path, tmp_path / "out2")
    # A missing member: an image without its annotation.
    make_chase_db1(tmp_path / "src")
    with zipfile.ZipFile(zpath) as z:
        members = {n: z.read(n) for n in z.namelist() if n != "Image_11L_1stHO.png"}
    write_zip(zpath, members)
    with pytest.raises(SegpromptError, match="'Image_11L.jpg' in .* has no label 'Image_11L_1stHO.png'"):
        chase(tmp_path, tmp_path / "out3")
    # A member that is not an image at all.
    members["Image_11L_1stHO.png"] = b"not a png"
    write_zip(zpath, members)
    with pytest.raises(SegpromptError, match="'Image_11L_1stHO.png' in .* is not a readable image"):
        chase(tmp_path, tmp_path / "out4")
    # A gzipped member (STARE) that does not inflate.
    write_tar(tmp_path / "stare" / "stare-images.tar", {"im0001.ppm.gz": b"\x1f\x8b\x08 broken"})
    write_tar(tmp_path / "stare" / "labels-ah.tar",
              {"im0001.ah.ppm.gz": gzip.compress(cv2.imencode(".ppm", np.zeros((4, 4, 3), np.uint8))[1].tobytes())})
    with pytest.raises(SegpromptError, match="gzipped member 'im0001.ppm.gz'"):
        prepare("stare", [tmp_path / "stare"], tmp_path / "out5", expect_counts={"train": 1, "val": 0})


def test_counts_are_checked_against_the_official_release_unless_told(tmp_path):
    make_ade20k(tmp_path / "src", n_train=3, n_val=2)
    with pytest.raises(SegpromptError) as e:
        prepare("ade20k", [tmp_path / "src"], tmp_path / "out")
    assert "{'train': 20210, 'val': 2000}" in str(e.value) and "--expect-counts train=3,val=2" in str(e.value)
    with pytest.raises(SegpromptError, match=r"found 3 images but the split sizes \{.train.: 20, .val.: 8\}"):
        make_chase_db1(tmp_path / "chase")
        prepare("chase_db1", [tmp_path / "chase"], tmp_path / "out")


def test_check_reverifies_a_prepared_folder(tmp_path):
    make_chase_db1(tmp_path / "src")
    out = tmp_path / "chase"
    meta = chase(tmp_path, out)
    assert check("chase_db1", out) == meta
    label = out / "ann_dir" / "val" / "Image_11L.png"
    lbl = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    lbl[0, 0] = 7
    cv2.imwrite(str(label), lbl)
    (out / "img_dir" / "train" / "Image_01L.png").unlink()
    (out / "img_dir" / "train" / "extra.png").write_bytes(png(np.zeros((4, 4, 3), np.uint8)))
    (out / "img_dir" / "train" / "Image_01R.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(SegpromptError) as e:
        check("chase_db1", out)
    msg = str(e.value)
    assert f"label '{label}' has values [7]" in msg
    assert f"missing file '{out / 'img_dir' / 'train' / 'Image_01L.png'}'" in msg
    assert "unexpected file" in msg and "extra.png" in msg
    assert "Image_01R.png' does not decode" in msg
    with pytest.raises(SegpromptError, match="holds the dataset 'chase_db1', not 'stare'"):
        check("stare", out)


@pytest.mark.timeout(120)
def test_parallel_conversion_equals_sequential(tmp_path):
    # OpenCV's thread pool busy in this process first: a worker forked from it would hang forever.
    cv2.GaussianBlur(np.random.default_rng(0).random((3000, 3000), np.float32), (0, 0), 5)
    make_vaihingen(tmp_path / "src")
    kw = dict(tile_size=16, tile_stride=8, expect_counts=vaihingen_counts(16, 8, "mmseg"))
    prepare("vaihingen", [tmp_path / "src"], tmp_path / "one", nproc=1, **kw)
    reports = []
    prepare("vaihingen", [tmp_path / "src"], tmp_path / "two", nproc=2, progress=lambda *r: reports.append(r), **kw)
    converting = [done for stage, done, total in reports if stage == "converting"]
    assert converting[0] == 0 and converting[-1] == 3 and converting == sorted(converting)  # 3 areas
    one, two = digest(tmp_path / "one"), digest(tmp_path / "two")
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one if k != "meta.json")


def test_extracted_folder_works_like_the_archive(tmp_path):
    make_chase_db1(tmp_path / "src")
    with zipfile.ZipFile(tmp_path / "src" / "CHASEDB1.zip") as z:
        z.extractall(tmp_path / "extracted" / "CHASEDB1")
    a = chase(tmp_path, tmp_path / "from_zip")
    b = prepare("chase_db1", [tmp_path / "extracted"], tmp_path / "from_folder", expect_counts=CHASE_COUNTS)
    assert b.extra["sources"][0]["kind"] == "folder" and b.extra["sources"][0]["files"] == 6
    da, db = digest(tmp_path / "from_zip"), digest(tmp_path / "from_folder")
    assert all(da[k] == db[k] for k in da if k != "meta.json") and a.label_values == b.label_values


@pytest.mark.slow
def test_cli_prepare_check_and_errors(tmp_path):
    make_chase_db1(tmp_path / "src")
    out = tmp_path / "chase"
    r = run_cli("prepare", "chase_db1", "--src", str(tmp_path / "src"), "--out", str(out),
                "--expect-counts", "train=2,val=1", "--nproc", "2")
    assert r.returncode == 0, r.stderr
    assert "prepared chase_db1" in r.stdout and "train 2, val 1" in r.stdout
    r = run_cli("prepare", "chase_db1", "--check", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "ok chase_db1" in r.stdout
    r = run_cli("prepare", "stare", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "stare"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: stare: the images archive 'stare-images.tar' is not in")
    r = run_cli("prepare", "chase_db1", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "x"),
                "--tiling", "mmseg")
    assert r.returncode == 2 and "--tiling does not apply to chase_db1 (only to vaihingen)" in r.stderr
    r = run_cli("prepare", "synthetic", "--out", str(tmp_path / "syn"), "--src", str(tmp_path / "src"))
    assert r.returncode == 2 and "--src" in r.stderr


def test_prepared_output_feeds_train_unchanged(tmp_path):
    from segprompt.build import tuning_context
    from segprompt.config import load_recipe
    from segprompt.training.launch import train

    make_vaihingen(tmp_path / "src")
    root = tmp_path / "vaihingen"
    meta = prepare("vaihingen", [tmp_path / "src"], root, tile_size=16, tile_stride=8,
                   expect_counts=vaihingen_counts(16, 8, "mmseg"))
    recipe = write_recipe(tmp_path / "r.yaml", root, data={"dataset": "vaihingen", "num_classes": 6, "batch_size": 2,
                                                           "train": {"scale": [32, 32], "crop_size": [16, 16]},
                                                           "test": {"scale": [32, 32]}},
                          schedule={"iters": 2, "warmup_iters": 0}, evaluation={"interval": 0},
                          checkpoint={"interval": 2})
    train(recipe, out=tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "run" / "eval.json").is_file()
    # the SPM's M0 is the train-split prior meta.json records (read through the same cache)
    prior = tuning_context(load_recipe(recipe), meta).class_prior(64)
    np.testing.assert_array_equal(prior, np.load(root / meta.extra["class_prior"]["file"]))


def test_one_extracted_folder_can_hold_several_archives(tmp_path):
    make_cityscapes(tmp_path / "src")
    for name in ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"):
        with zipfile.ZipFile(tmp_path / "src" / name) as z:
            z.extractall(tmp_path / "cityscapes_raw")
    a = prepare("cityscapes", [tmp_path / "src"], tmp_path / "a", expect_counts={"train": 2, "val": 1})
    b = prepare("cityscapes", [tmp_path / "cityscapes_raw"], tmp_path / "b", expect_counts={"train": 2, "val": 1})
    assert [(s["role"], s["kind"], s["files"]) for s in b.extra["sources"]] == [("images", "folder", 3),
                                                                                 ("labels", "folder", 3)]
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert all(da[k] == db[k] for k in da if k != "meta.json") and a.label_values == b.label_values


def test_cli_knows_every_real_dataset():
    from segprompt.cli.data import PREPARERS
    from segprompt.data.prepare import DATASETS

    assert {"synthetic", *DATASETS} <= set(PREPARERS)
