"""`segprompt prepare synthetic`: layout, meta.json, determinism, domain shift, safe (re)writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from segprompt.data.meta import ANN_DIR, IMG_DIR, read_meta
from segprompt.data.synthetic import generate_synthetic
from segprompt.errors import SegpromptError
from segprompt.io import sha256_file

SMALL = dict(num_classes=6, image_size=(64, 80), counts={"train": 6, "val": 3})


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def read_label(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_layout_and_meta(tmp_path):
    out = tmp_path / "syn"
    meta = generate_synthetic(out, seed=3, **SMALL)
    for split, n in SMALL["counts"].items():
        images = sorted((out / IMG_DIR / split).iterdir())
        labels = sorted((out / ANN_DIR / split).iterdir())
        assert [p.name for p in images] == [p.name for p in labels] == [f"{i:05d}.png" for i in range(n)]
        for img_path, label_path in zip(images, labels):
            img = cv2.imread(str(img_path), cv2.IMREAD_UNCHANGED)
            label = read_label(label_path)
            assert img.shape == (64, 80, 3) and img.dtype == np.uint8
            assert label.shape == (64, 80) and label.dtype == np.uint8
    on_disk = read_meta(out, "synthetic")
    assert on_disk == meta
    assert meta.name == "synthetic"
    assert meta.classes[:6] == ["background", "disk", "box", "triangle", "ring", "stripes"]
    assert len(meta.palette) == 6 and len({tuple(c) for c in meta.palette}) == 6
    assert meta.ignore_index == 255
    assert meta.splits == {"train": 6, "val": 3}
    assert meta.extra["generator"] == {"version": 1, "seed": 3, "num_classes": 6, "image_size": [64, 80],
                                       "counts": {"train": 6, "val": 3}, "domain_shift": 0.0,
                                       "ignore_border": True}
    for split in SMALL["counts"]:
        found = set()
        for p in (out / ANN_DIR / split).iterdir():
            found |= set(np.unique(read_label(p)).tolist())
        assert meta.label_values[split] == sorted(found)


@pytest.mark.parametrize("num_classes", [2, 11, 32])
def test_label_values_and_class_names(tmp_path, num_classes):
    meta = generate_synthetic(tmp_path / "syn", num_classes=num_classes, image_size=(64, 64), counts={"train": 12})
    assert len(meta.classes) == len(set(meta.classes)) == num_classes
    assert len({tuple(c) for c in meta.palette}) == num_classes
    values = set(meta.label_values["train"])
    assert values <= set(range(num_classes)) | {255}
    assert 0 in values and 255 in values and len(values - {0, 255}) >= min(num_classes - 1, 5)


def test_ignore_only_on_object_boundaries(tmp_path):
    with_border = generate_synthetic(tmp_path / "a", seed=1, ignore_border=True, **SMALL)
    without = generate_synthetic(tmp_path / "b", seed=1, ignore_border=False, **SMALL)
    assert 255 in with_border.label_values["train"] and 255 not in without.label_values["train"]
    for name in ("00000.png", "00001.png"):
        full = read_label(tmp_path / "b" / ANN_DIR / "train" / name)
        eroded = read_label(tmp_path / "a" / ANN_DIR / "train" / name)
        ignored = eroded == 255
        np.testing.assert_array_equal(eroded[~ignored], full[~ignored])
        # Every ignored pixel sits where the full label changes between it and its right/lower neighbour.
        edge = np.zeros_like(ignored)
        edge[:, :-1] |= full[:, :-1] != full[:, 1:]
        edge[:-1, :] |= full[:-1, :] != full[1:, :]
        np.testing.assert_array_equal(ignored, edge)
        assert ignored.mean() < 0.15


def test_deterministic_for_a_seed(tmp_path):
    generate_synthetic(tmp_path / "a", seed=7, **SMALL)
    generate_synthetic(tmp_path / "b", seed=7, **SMALL)
    generate_synthetic(tmp_path / "c", seed=8, **SMALL)
    a, b, c = (tree_digest(tmp_path / n) for n in "abc")
    assert a == b  # byte-identical, meta.json included
    differing = [k for k in a if k.startswith(IMG_DIR) and a[k] != c[k]]
    assert len(differing) == 9


@pytest.mark.slow
def test_same_files_in_another_process(tmp_path):
    """Nothing depends on per-process state such as Python's salted str hash."""
    generate_synthetic(tmp_path / "here", seed=7, **SMALL)
    code = ("import sys; from segprompt.data.synthetic import generate_synthetic; "
            f"generate_synthetic(sys.argv[1], seed=7, **{SMALL!r})")
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env)
    assert tree_digest(tmp_path / "here") == tree_digest(tmp_path / "there")


def test_images_depend_on_seed_split_and_index_only(tmp_path):
    generate_synthetic(tmp_path / "small", seed=2, num_classes=6, image_size=(64, 64), counts={"train": 3, "val": 2})
    generate_synthetic(tmp_path / "big", seed=2, num_classes=6, image_size=(64, 64), counts={"val": 2, "train": 5})
    small, big = tree_digest(tmp_path / "small"), tree_digest(tmp_path / "big")
    for key in small:
        if key != "meta.json":
            assert small[key] == big[key], key
    # The same index in another split is another image.
    assert small[f"{IMG_DIR}/train/00000.png"] != small[f"{IMG_DIR}/val/00000.png"]


def test_domain_shift_changes_images_not_labels(tmp_path):
    generate_synthetic(tmp_path / "src", seed=4, domain_shift=0.0, **SMALL)
    generate_synthetic(tmp_path / "mid", seed=4, domain_shift=0.5, **SMALL)
    generate_synthetic(tmp_path / "tgt", seed=4, domain_shift=1.0, **SMALL)
    diffs = {"mid": [], "tgt": []}
    for split, n in SMALL["counts"].items():
        for i in range(n):
            rel = f"{split}/{i:05d}.png"
            src_label = read_label(tmp_path / "src" / ANN_DIR / rel)
            src = cv2.imread(str(tmp_path / "src" / IMG_DIR / rel)).astype(np.float32)
            for name in diffs:
                np.testing.assert_array_equal(read_label(tmp_path / name / ANN_DIR / rel), src_label)
                img = cv2.imread(str(tmp_path / name / IMG_DIR / rel)).astype(np.float32)
                diffs[name].append(np.abs(img - src).mean())
    # The appearance changes, and more at a larger shift.
    assert min(diffs["mid"]) > 5
    assert np.mean(diffs["tgt"]) > np.mean(diffs["mid"])


def test_second_call_with_same_options_rewrites_nothing(tmp_path):
    out = tmp_path / "syn"
    first = generate_synthetic(out, seed=5, **SMALL)
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    calls = []
    second = generate_synthetic(out, seed=5, progress=lambda done, total: calls.append(done), **SMALL)
    assert second == first
    assert calls == []
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def test_refuses_to_overwrite_different_options(tmp_path):
    out = tmp_path / "syn"
    generate_synthetic(out, seed=5, **SMALL)
    before = tree_digest(out)
    with pytest.raises(SegpromptError) as err:
        generate_synthetic(out, seed=6, **SMALL)
    assert str(out) in str(err.value) and "--out" in str(err.value) and "--force" in str(err.value)
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def test_refuses_a_folder_that_is_not_a_synthetic_dataset(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SegpromptError, match="--force"):
        generate_synthetic(out, **SMALL)
    assert (out / "notes.txt").read_text() == "keep me"


def test_empty_folder_is_used(tmp_path):
    out = tmp_path / "syn"
    out.mkdir()
    meta = generate_synthetic(out, **SMALL)
    assert read_meta(out) == meta


def test_force_moves_the_old_folder_aside(tmp_path):
    out = tmp_path / "syn"
    generate_synthetic(out, seed=5, **SMALL)
    old = tree_digest(out)
    meta = generate_synthetic(out, seed=6, force=True, **SMALL)
    assert meta.extra["generator"]["seed"] == 6 and read_meta(out) == meta
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("syn.old-")]
    assert len(aside) == 1 and tree_digest(aside[0]) == old
    generate_synthetic(out, seed=7, force=True, **SMALL)  # a second force in the same second
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("syn.old-")]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_interrupted_run_leaves_no_dataset_and_no_temp_folder(tmp_path):
    out = tmp_path / "syn"

    def interrupt(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(out, progress=interrupt, **SMALL)
    assert list(tmp_path.iterdir()) == []
    # A complete run afterwards works and reports progress for every image.
    calls = []
    generate_synthetic(out, progress=lambda done, total: calls.append((done, total)), **SMALL)
    assert calls == [(i, 9) for i in range(1, 10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


@pytest.mark.parametrize("kwargs", [dict(num_classes=1), dict(num_classes=33), dict(domain_shift=1.5),
                                    dict(image_size=(16, 64)), dict(counts={"train": -1}),
                                    dict(counts={"../x": 1})])
def test_invalid_options_are_user_errors(tmp_path, kwargs):
    with pytest.raises(SegpromptError):
        generate_synthetic(tmp_path / "syn", **kwargs)
    assert not (tmp_path / "syn").exists()


def test_default_dataset_is_fast(tmp_path):
    t0 = time.perf_counter()
    meta = generate_synthetic(tmp_path / "syn")
    assert time.perf_counter() - t0 < 5.0
    assert meta.splits == {"train": 64, "val": 16, "test": 16}
    assert cv2.imread(str(tmp_path / "syn" / IMG_DIR / "train" / "00000.png")).shape == (128, 128, 3)


def test_first_class_and_object_scale_make_a_task_and_scale_shift(tmp_path):
    base = generate_synthetic(tmp_path / "a", seed=4, num_classes=6, image_size=(48, 48), counts={"train": 3})
    assert "first_class" not in base.extra["generator"] and "object_scale" not in base.extra["generator"]
    shifted = generate_synthetic(tmp_path / "b", seed=4, num_classes=6, image_size=(48, 48), counts={"train": 3},
                                 first_class=5)
    assert base.classes == ["background", "disk", "box", "triangle", "ring", "stripes"]
    assert shifted.classes == ["background", "cross", "star", "hexagon", "diamond", "crescent"]
    small = generate_synthetic(tmp_path / "c", seed=4, num_classes=6, image_size=(48, 48), counts={"train": 3},
                               object_scale=0.5)

    def fg(root):
        return sum((cv2.imread(str(p), cv2.IMREAD_UNCHANGED) % 255 > 0).sum()
                   for p in sorted((root / "ann_dir" / "train").glob("*.png")))

    assert fg(tmp_path / "c") < 0.6 * fg(tmp_path / "a")  # half the radius: about a quarter of the area
    assert small.extra["generator"]["object_scale"] == 0.5
    with pytest.raises(SegpromptError, match="first_class 6"):
        generate_synthetic(tmp_path / "d", num_classes=6, first_class=6, counts={"train": 1})
