"""Training/test transforms: image-label alignment, mmseg resize/crop semantics, seeded randomness."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from segprompt.data import (
    transforms,  # TestTransform via the module: pytest would collect the name
)
from segprompt.data.transforms import (
    TrainTransform,
    label_to_tensor,
    normalize,
    to_tensor,
)

# Colours far apart, so the class of a pixel can be read back from its colour.
PALETTE = np.array([[0, 0, 255], [255, 0, 0], [0, 255, 0], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [128, 128, 128], [255, 255, 255]], np.uint8)


STEP = 30  # class k has label value STEP * k: interpolating two labels gives a value no class has


def block_scene(h: int, w: int, seed: int = 0, block: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric label of random blocks, with image = PALETTE[label // STEP]."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, len(PALETTE), (-(-h // block), -(-w // block)), dtype=np.uint8)
    classes = np.ascontiguousarray(np.kron(cells, np.ones((block, block), np.uint8))[:h, :w])
    return PALETTE[classes], classes * STEP


def coord_scene(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Image channels 0/1 hold x/y of each pixel; the label is a function of (x, y) too."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    return img, ((xx * 7 + yy * 3) % 200).astype(np.uint8)


def decode(img: np.ndarray) -> np.ndarray:
    """The label value whose palette colour is nearest to each pixel."""
    dist = ((img[:, :, None, :].astype(np.int32) - PALETTE[None, None].astype(np.int32)) ** 2).sum(-1)
    return (dist.argmin(-1) * STEP).astype(np.uint8)


def uniform_3x3(label: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds a single label value (borders excluded)."""
    c = label[1:-1, 1:-1]
    same = np.ones_like(c, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= label[1 + dy:label.shape[0] - 1 + dy, 1 + dx:label.shape[1] - 1 + dx] == c
    out = np.zeros_like(label, bool)
    out[1:-1, 1:-1] = same
    return out


ALIGNMENT_CASES = {
    "ratio_resize_crop_flip": dict(scale=(256, 96), ratio_range=(0.5, 2.0), crop_size=(64, 64)),
    "no_keep_ratio": dict(scale=(150, 70), keep_ratio=False, crop_size=(48, 64), flip_prob=1.0),
    "choice_of_scales": dict(scales=[(200, 60), (320, 120)], crop_size=(64, 80)),
    "crop_larger_than_image": dict(scale=(128, 48), crop_size=(96, 160), flip_prob=1.0),
    "crop_with_cat_max_ratio": dict(crop_size=(40, 40), cat_max_ratio=0.5),
}


@pytest.mark.parametrize("case", ALIGNMENT_CASES)
def test_image_and_label_stay_aligned(case):
    kwargs = ALIGNMENT_CASES[case]
    t = TrainTransform(photometric=False, **kwargs)
    img, label = block_scene(96, 128, seed=1)
    for seed in range(8):
        out_img, out_label = t(img, label, np.random.default_rng(seed))
        assert out_img.dtype == np.uint8 and out_label.dtype == np.uint8
        assert out_img.shape[:2] == out_label.shape == t.crop_size
        padded = out_label == 255
        # Nearest-neighbour label resizing never invents class ids between two neighbours.
        assert set(np.unique(out_label[~padded])) <= set(np.unique(label))
        # Our label has no ignore pixels: 255 only where padding was added, and there the image is 0.
        assert not out_img[padded].any()
        if case == "crop_larger_than_image":
            assert padded.any()
            assert padded[-1].all() and padded[:, -1].all()  # padding is at the bottom/right
        check = uniform_3x3(out_label) & ~padded
        assert check.sum() > 0.3 * (~padded).sum()
        np.testing.assert_array_equal(decode(out_img)[check], out_label[check])


def test_crop_is_a_window_and_flip_mirrors_it():
    img, label = coord_scene(60, 90)
    t = TrainTransform(crop_size=(32, 48), flip_prob=1.0, photometric=False)
    for seed in range(5):
        out_img, out_label = t(img, label, np.random.default_rng(seed))
        x0, y0 = int(out_img[0, -1, 0]), int(out_img[0, -1, 1])  # flipped: the window's left column is last
        window = slice(y0, y0 + 32), slice(x0, x0 + 48)
        np.testing.assert_array_equal(out_img, img[window][:, ::-1])
        np.testing.assert_array_equal(out_label, label[window][:, ::-1])


def test_flip_probability_zero_and_one():
    img, label = block_scene(40, 50)
    never = TrainTransform(flip_prob=0.0, photometric=False)
    always = TrainTransform(flip_prob=1.0, photometric=False)
    for seed in range(3):
        out_img, out_label = never(img, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(out_img, img)
        np.testing.assert_array_equal(out_label, label)
        out_img, out_label = always(img, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(out_img, img[:, ::-1])
        np.testing.assert_array_equal(out_label, label[:, ::-1])


def test_padding_fills_image_with_zero_and_label_with_ignore():
    img, label = coord_scene(40, 30)
    img[..., 2] = 7  # no pixel of the input is all zero
    out_img, out_label = TrainTransform(crop_size=(64, 64), flip_prob=0.0, photometric=False, ignore_index=250)(
        img, label, np.random.default_rng(0))
    assert out_img.shape == (64, 64, 3) and out_label.shape == (64, 64)
    np.testing.assert_array_equal(out_img[:40, :30], img)
    np.testing.assert_array_equal(out_label[:40, :30], label)
    assert not out_img[40:].any() and not out_img[:, 30:].any()
    assert (out_label[40:] == 250).all() and (out_label[:, 30:] == 250).all()


def full_transform() -> TrainTransform:
    return TrainTransform(scale=(256, 96), ratio_range=(0.5, 2.0), crop_size=(64, 64), cat_max_ratio=0.75)


def test_same_seed_same_output_regardless_of_global_random_state():
    img, label = block_scene(96, 128)
    t = full_transform()
    outputs = []
    for global_seed in range(6):
        np.random.seed(global_seed)
        random.seed(global_seed)
        torch.manual_seed(global_seed)
        outputs.append(t(img, label, np.random.default_rng(123)))
    for out_img, out_label in outputs[1:]:
        np.testing.assert_array_equal(out_img, outputs[0][0])
        np.testing.assert_array_equal(out_label, outputs[0][1])
    other = t(img, label, np.random.default_rng(124))
    assert not np.array_equal(other[0], outputs[0][0])


def test_cat_max_ratio_rejects_single_class_crops():
    # 32x128 label: class 0 in columns 0..95, class 1 in 96..127. A 32x32 crop is balanced
    # (largest class < 75 %) only for offsets 73..87, i.e. ~15 % of single tries.
    label = np.zeros((32, 128), np.uint8)
    label[:, 96:] = 1
    img = PALETTE[label]

    def balanced_fraction(cat_max_ratio: float) -> float:
        t = TrainTransform(crop_size=(32, 32), cat_max_ratio=cat_max_ratio, flip_prob=0.0, photometric=False)
        ok = 0
        for seed in range(300):
            _, crop = t(img, label, np.random.default_rng(seed))
            counts = np.bincount(crop.ravel(), minlength=2)
            ok += counts.min() > 0 and counts.max() / counts.sum() < 0.75
        return ok / 300

    assert balanced_fraction(1.0) < 0.3  # no retries
    assert balanced_fraction(0.75) > 0.7  # up to 10 tries: 1 - 0.85**10 ~ 0.8


def test_cat_max_ratio_ignores_ignore_pixels():
    # Class 0 and ignore only: every crop has a single labelled class, so no try succeeds, and the
    # transform must still return a crop (the last try) rather than fail or count 255 as a class.
    label = np.zeros((32, 128), np.uint8)
    label[:, 64:] = 255
    img = PALETTE[label % len(PALETTE)]
    t = TrainTransform(crop_size=(32, 32), cat_max_ratio=0.75, flip_prob=0.0, photometric=False)
    fractions = []
    for seed in range(200):
        _, crop = t(img, label, np.random.default_rng(seed))
        assert crop.shape == (32, 32)
        fractions.append((crop == 0).mean())
    # Had 255 counted as a class, crops straddling column 64 would be preferred (mean ~0.5 at 0 / 255
    # mix); without it the offsets stay uniform, so many crops are pure class 0 or pure ignore.
    assert np.mean([f in (0.0, 1.0) for f in fractions]) > 0.4


@pytest.mark.parametrize("hw, scale, ratio, expected", [
    ((512, 683), (2048, 512), 1.0, (512, 683)),  # ADE20K landscape: short side 512
    ((683, 512), (2048, 512), 1.0, (683, 512)),
    ((512, 683), (2048, 512), 0.5, (256, 342)),  # scale (1024, 256): 683 * 0.5 rounds half up
    ((512, 683), (2048, 512), 2.0, (1024, 1366)),
    ((1024, 2048), (2048, 512), 1.0, (512, 1024)),  # the long side limits: 2048 / 2048 vs 512 / 1024
    ((1024, 2048), (2048, 1024), 1.0, (1024, 2048)),
])
def test_resize_scale_semantics(hw, scale, ratio, expected):
    img, label = block_scene(*hw)
    t = TrainTransform(scale=scale, ratio_range=(ratio, ratio), flip_prob=0.0, photometric=False)
    out_img, out_label = t(img, label, np.random.default_rng(0))
    assert out_img.shape == (*expected, 3) and out_label.shape == expected


def test_resize_without_keep_ratio_is_exact_width_height():
    img, label = block_scene(512, 683)
    out_img, out_label = TrainTransform(scale=(300, 200), keep_ratio=False, flip_prob=0.0, photometric=False)(
        img, label, np.random.default_rng(0))
    assert out_img.shape == (200, 300, 3) and out_label.shape == (200, 300)


def test_scales_picks_each_listed_scale():
    img, label = block_scene(100, 100)
    t = TrainTransform(scales=[(100, 50), (400, 80)], flip_prob=0.0, photometric=False)
    shapes = {t(img, label, np.random.default_rng(s))[1].shape for s in range(30)}
    assert shapes == {(50, 50), (80, 80)}


def test_invalid_resize_options():
    with pytest.raises(ValueError, match="mutually exclusive"):
        TrainTransform(scale=(512, 256), ratio_range=(0.5, 2.0), scales=[(512, 256)])
    with pytest.raises(ValueError, match="mutually exclusive"):
        TrainTransform(scale=(512, 256), scales=[(512, 256)])
    with pytest.raises(ValueError, match="base scale"):
        TrainTransform(ratio_range=(0.5, 2.0))


def test_photometric_is_a_per_colour_mapping_that_changes_the_image():
    img, label = block_scene(64, 64, block=4)
    t = TrainTransform(flip_prob=0.0, photometric=True)
    changed = 0
    for seed in range(16):
        out_img, out_label = t(img, label, np.random.default_rng(seed))
        assert out_img.dtype == np.uint8 and out_img.shape == img.shape
        np.testing.assert_array_equal(out_label, label)
        # Every pixel of the same input colour gets the same output colour (no spatial effects).
        for k in range(len(PALETTE)):
            colours = np.unique(out_img[label == k * STEP], axis=0)
            assert len(colours) <= 1
        changed += not np.array_equal(out_img, img)
    assert changed >= 12  # all four distortions are skipped with probability 1/16


def test_test_transform_keeps_aspect_ratio():
    img, _ = block_scene(512, 683)
    assert transforms.TestTransform(scale=(2048, 512))(img).shape == (512, 683, 3)
    img, _ = block_scene(1000, 2000)
    assert transforms.TestTransform(scale=(2048, 512))(img).shape == (512, 1024, 3)
    img, _ = block_scene(300, 200)  # portrait: short side 512, long 768 < 2048
    assert transforms.TestTransform(scale=(2048, 512))(img).shape == (768, 512, 3)
    assert transforms.TestTransform(scale=(640, 480), keep_ratio=False)(img).shape == (480, 640, 3)
    assert transforms.TestTransform()(img) is img


def test_normalize_to_tensor_and_label_to_tensor():
    img, label = block_scene(8, 12)
    t = to_tensor(img)
    assert t.dtype == torch.uint8 and t.shape == (3, 8, 12) and t.is_contiguous()
    assert torch.equal(t.permute(1, 2, 0), torch.from_numpy(img))
    lt = label_to_tensor(label)
    assert lt.dtype == torch.int64 and torch.equal(lt, torch.from_numpy(label).long())

    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    batch = torch.stack([t, t])
    out = normalize(batch, mean, std)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    expected = (batch.double() - torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(normalize(batch.float(), mean, std), out)
    with pytest.raises(ValueError):
        normalize(batch[:, :2], mean, std)
