"""Whole / sliding-window / TTA inference and prediction export."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from segprompt.evaluation.inference import (
    colorize,
    inference,
    save_prediction,
    slide_inference,
    whole_inference,
)

K = 4


class _Pointwise(nn.Module):
    """A 1x1 conv: each output pixel depends on its input pixel only (translation/flip-equivariant).
    Like every segprompt model it takes the input's ``view``; this one has no use for it."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, K, 1)
        self.double().eval()

    def forward(self, x, view=None):
        return self.conv(x)


def _pointwise(seed: int = 0) -> nn.Module:
    return _Pointwise(seed)


class _ContextNet(nn.Module):
    """3x3 conv then /4 pooling: logits at quarter resolution that depend on context."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, K, 3, padding=1)
        self.pool = nn.AvgPool2d(4, ceil_mode=True)
        self.double().eval()

    def forward(self, x, view=None):
        return self.pool(self.conv(x))


class _Recorder:
    """Wraps a model, records the input shapes it sees and optionally insists on one size."""

    def __init__(self, model, require_hw=None):
        self.model, self.require_hw, self.shapes = model, require_hw, []

    def __call__(self, x, view=None):
        self.shapes.append(tuple(x.shape))
        if self.require_hw is not None:
            assert tuple(x.shape[-2:]) == self.require_hw
        return self.model(x)


def _image(b=1, h=37, w=53, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_whole_resizes_to_out_size_and_single_pass_returns_logits():
    model, img = _ContextNet(), _image()
    out = inference(model, img, (37, 53))
    assert out.shape == (1, K, 37, 53)
    expected = nn.functional.interpolate(model(img), size=(37, 53), mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected)
    assert torch.equal(whole_inference(_pointwise(), img, (37, 53)), _pointwise()(img))


def test_slide_with_one_window_covering_the_image_equals_whole():
    model, img = _ContextNet(), _image(b=2)
    slide = slide_inference(model, img, (37, 53), crop_size=(37, 53), stride=(20, 20))
    assert torch.allclose(slide, whole_inference(model, img, (37, 53)))


def test_slide_with_overlap_on_pointwise_model_equals_whole():
    model = _Recorder(_pointwise(), require_hw=(16, 20))
    img = _image(b=2)
    out = inference(model, img, (37, 53), mode="slide", crop_size=(16, 20), stride=(10, 12))
    assert torch.allclose(out, whole_inference(_pointwise(), img, (37, 53)))
    # mmseg grid: H=37 -> windows at y 0,10,20,21 (4); W=53 -> x 0,12,24,33 (4); 2 images
    assert sum(s[0] for s in model.shapes) == 4 * 4 * 2


def test_crop_larger_than_image_is_padded_and_cut_back():
    model = _Recorder(_pointwise(), require_hw=(32, 64))
    img = _image(h=20, w=30)
    out = slide_inference(model, img, (20, 30), crop_size=(32, 64), stride=(16, 32))
    assert torch.allclose(out, whole_inference(_pointwise(), img, (20, 30)))
    assert len(model.shapes) == 1
    # Also in one dimension only, with a down-sampling model.
    ctx = _Recorder(_ContextNet(), require_hw=(32, 24))
    out = slide_inference(ctx, img, (40, 60), crop_size=(32, 24), stride=(16, 12))
    assert out.shape == (1, K, 40, 60) and torch.isfinite(out).all()


def test_batch_size_does_not_change_result_and_batches_across_windows():
    img = _image(b=2, h=30, w=40)
    one = _Recorder(_ContextNet())
    five = _Recorder(_ContextNet())
    a = slide_inference(one, img, (30, 40), crop_size=(16, 16), stride=(12, 12), batch_size=1)
    b = slide_inference(five, img, (30, 40), crop_size=(16, 16), stride=(12, 12), batch_size=5)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # 3 x 3 windows x 2 images = 18 crops
    assert [s[0] for s in one.shapes] == [1] * 18
    assert [s[0] for s in five.shapes] == [5, 5, 5, 3]


def test_slide_rejects_gaps_between_windows():
    with pytest.raises(ValueError, match="stride"):
        slide_inference(_pointwise(), _image(), (37, 53), crop_size=(16, 16), stride=(20, 8))


def test_mode_validation():
    with pytest.raises(ValueError, match=r"'sliding'.*'whole', 'slide'"):
        inference(_pointwise(), _image(), (37, 53), mode="sliding")
    with pytest.raises(ValueError, match="crop_size and stride"):
        inference(_pointwise(), _image(), (37, 53), mode="slide", crop_size=(16, 16))


def test_flip_tta_on_flip_equivariant_model_matches_single_pass():
    model, img = _pointwise(), _image()
    single = inference(model, img, (37, 53))
    tta = inference(model, img, (37, 53), flip=True)
    assert torch.allclose(tta, single.softmax(dim=1))
    assert torch.equal(tta.argmax(1), single.argmax(1))


def test_multiscale_tta_averages_probabilities_of_every_scale():
    model = _Recorder(_pointwise())
    img = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 20, 30)
    single = inference(_pointwise(), img, (20, 30))
    for mode, kw in (("whole", {}), ("slide", {"crop_size": (16, 16), "stride": (8, 8)})):
        model.shapes.clear()
        tta = inference(model, img, (20, 30), mode=mode, scales=[0.5, 1.0, 1.5], flip=True, **kw)
        # A constant image looks the same at every scale.
        assert torch.allclose(tta, single.softmax(dim=1))
        assert torch.allclose(tta.sum(dim=1), torch.ones(1, 20, 30, dtype=torch.float64))
        if mode == "whole":
            sizes = [(10, 15), (10, 15), (20, 30), (20, 30), (30, 45), (30, 45)]
            assert [s[-2:] for s in model.shapes] == sizes


class _LeftToRight(nn.Module):
    """Not flip-equivariant: each class score is a running sum of the input from the left."""

    def forward(self, x, view=None):
        run = x[:, :1].cumsum(dim=-1)
        return torch.cat([run * (k - 1.5) for k in range(K)], dim=1)


def test_flipped_pass_logits_are_flipped_back():
    model, img = _LeftToRight(), _image(h=8, w=12)
    tta = inference(model, img, (8, 12), flip=True)
    # The flipped pass must see the image reversed and its output reversed back: a right-to-left sum.
    right_to_left = img[:, :1].flip(-1).cumsum(dim=-1).flip(-1)
    flipped_pass = torch.cat([right_to_left * (k - 1.5) for k in range(K)], dim=1)
    expected = (model(img).softmax(1) + flipped_pass.softmax(1)) / 2
    assert torch.allclose(tta, expected)


def test_colorize_maps_palette_and_blacks_out_unknown_ids():
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    pred = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    assert colorize(pred, palette).tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 0, 0]]]


def test_save_prediction_round_trip(tmp_path):
    palette = [[255, 0, 0], [0, 255, 0], [10, 20, 250]]
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=(9, 11)).astype(np.uint8)
    pred[0, 0] = 255
    image = rng.integers(0, 256, size=(9, 11, 3)).astype(np.uint8)

    index_path, overlay_path = save_prediction(tmp_path / "preds", "img_001", pred, image, palette, alpha=1.0)
    assert index_path == tmp_path / "preds" / "img_001.png"
    assert overlay_path == tmp_path / "preds" / "img_001_overlay.png"
    index = cv2.imread(str(index_path), cv2.IMREAD_UNCHANGED)
    assert index.dtype == np.uint8 and index.ndim == 2 and np.array_equal(index, pred)
    overlay_rgb = cv2.cvtColor(cv2.imread(str(overlay_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(overlay_rgb, colorize(pred, palette))  # alpha=1: pure prediction colours, RGB order
    assert overlay_rgb[pred == 0].tolist()[0] == [255, 0, 0]

    save_prediction(tmp_path, "half", pred, image, palette, alpha=0.5)
    half = cv2.cvtColor(cv2.imread(str(tmp_path / "half_overlay.png")), cv2.COLOR_BGR2RGB)
    expected = 0.5 * image.astype(float) + 0.5 * colorize(pred, palette)
    assert np.abs(half - expected).max() <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.png", "half_overlay.png", "preds"]


def test_save_prediction_rejects_mismatched_image(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        save_prediction(tmp_path, "x", np.zeros((4, 5), np.uint8), np.zeros((5, 4, 3), np.uint8), [[0, 0, 0]])
