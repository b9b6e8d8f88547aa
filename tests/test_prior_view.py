"""M0 follows the image (docs/spm.md): views of training crops, sliding windows and flipped TTA passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segprompt.data.transforms import TrainTransform
from segprompt.data.view import identity_view, sub_view
from segprompt.evaluation.inference import inference, slide_inference
from segprompt.models.backbones.resnet import ResNet
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.losses import CrossEntropyLoss
from segprompt.models.segmentor import EncoderDecoder
from segprompt.tuning import TuningContext
from segprompt.tuning.spm import SPMChain, SPMTuning

K, R = 5, 64


def _ramp_prior(res: int = R) -> np.ndarray:
    """M0 whose class 0 is the x coordinate of each cell centre, class 1 the y coordinate, class 2
    x * y (not sums to one: the geometry is what is tested). Bilinear sampling with border padding
    reproduces the coordinates exactly, clamped to [0.5 / res, 1 - 0.5 / res]."""
    c = (np.arange(res, dtype=np.float32) + 0.5) / res
    y, x = np.meshgrid(c, c, indexing="ij")
    p = np.full((K, res, res), 0.25, np.float32)
    p[0], p[1], p[2] = x, y, x * y
    return p


def _clamp(c: torch.Tensor, res: int = R) -> torch.Tensor:
    return c.clamp(0.5 / res, 1 - 0.5 / res)


def _model(seed: int = 0, stages=(1, 3)) -> EncoderDecoder:
    """A tiny SPM-tuned segmentor whose output depends on M0 (the prompt convs are not zero)."""
    torch.manual_seed(seed)
    bb = ResNet(depth=18, base_channels=8, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    model = EncoderDecoder(bb, FCNHead(bb.out_channels[-1], K, channels=8, num_convs=1, loss=CrossEntropyLoss()))
    SPMTuning(stages=list(stages), channels=16).apply(model, TuningContext(K, class_prior=_ramp_prior))
    for spm in model.backbone.stage_hook.spms.values():
        torch.nn.init.normal_(spm.prompt_out.weight, std=0.5)
    return model.double().eval()


def _record_m0(model: EncoderDecoder) -> list[torch.Tensor]:
    """M0 as the first SPM's refinement branch receives it (after the SPM's own resize), per forward."""
    seen: list[torch.Tensor] = []
    first = model.backbone.stage_hook.spms[min(model.backbone.stage_hook.spms, key=int)]
    first.map_in.register_forward_pre_hook(lambda m, inp: seen.append(inp[1].detach().clone()))
    return seen


def _coords(box, size):
    """Original-image coordinates of the pixel centres of an input of ``size`` covering ``box``."""
    y0, x0, y1, x1, flipped = box
    h, w = size
    ty = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    tx = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    ys = y0 + ty * (y1 - y0)
    xs = x1 - tx * (x1 - x0) if flipped else x0 + tx * (x1 - x0)
    return ys[:, None].expand(h, w), xs[None, :].expand(h, w)


# (1) training views


def _replay_crop(seed: int, h: int, w: int, crop: tuple[int, int]) -> tuple[int, int]:
    """The crop offset TrainTransform draws (ratio draw, then y, then x), replayed by hand."""
    rng = np.random.default_rng(seed)
    rng.uniform(1.0, 1.0)  # ratio_range (1, 1)
    return int(rng.integers(max(h - crop[0], 0) + 1)), int(rng.integers(max(w - crop[1], 0) + 1))


def _float_image(h: int, w: int) -> np.ndarray:
    """The ramp prior's three first classes evaluated at every pixel centre of an h x w image."""
    y = (np.arange(h, dtype=np.float32) + 0.5) / h
    x = (np.arange(w, dtype=np.float32) + 0.5) / w
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return np.stack([xx, yy, xx * yy], axis=-1)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_train_view_is_the_crop_box_and_resampled_prior_matches_the_transformed_prior(flip):
    # 30 x 60 resized x2 to 60 x 120, cropped 80 x 64 (so 20 rows of padding), flipped or not
    h0, w0, crop = 30, 60, (80, 64)
    t = TrainTransform(scale=(120, 60), ratio_range=(1.0, 1.0), crop_size=crop, flip_prob=flip,
                       photometric=False, cat_max_ratio=1.0)
    chain = SPMChain({}, torch.from_numpy(_ramp_prior()), {}, CrossEntropyLoss())
    for seed in range(4):
        out_img, out_lbl, view = t(_float_image(h0, w0), np.zeros((h0, w0), np.uint8),
                                   np.random.default_rng(seed), return_view=True)
        y, x = _replay_crop(seed, 60, 120, crop)
        assert y == 0
        assert view == pytest.approx((0.0, x / 120, 80 / 60, (x + 64) / 120, flip))
        # the same draws as without the view
        plain_img, plain_lbl = t(_float_image(h0, w0), np.zeros((h0, w0), np.uint8), np.random.default_rng(seed))
        assert np.array_equal(plain_img, out_img) and np.array_equal(plain_lbl, out_lbl)

        chain.set_view(torch.tensor(view))
        m0 = chain.initial_map(torch.zeros(1, 3, *crop))[0]  # resampled at the crop's own size
        valid = torch.from_numpy(out_lbl != 255)
        assert valid.sum() == 60 * 64
        expect = torch.from_numpy(out_img).permute(2, 0, 1)  # the transformed full-resolution "prior"
        # away from the image's edges (where the resize of the image and M0's border padding clamp
        # at different half pixels) the two agree to rounding; near them, to those half pixels
        inner = valid & (expect[:2] > 1 / h0).all(0) & (expect[:2] < 1 - 1 / h0).all(0)
        assert inner.sum() > 0.8 * valid.sum()
        for k in range(3):
            torch.testing.assert_close(m0[k][inner], expect[k][inner], atol=2e-4, rtol=0)
            torch.testing.assert_close(m0[k][valid], expect[k][valid], atol=0.5 / h0 + 0.5 / R, rtol=0)
        # the padded rows repeat M0's bottom edge (border padding), the loss ignores them anyway
        torch.testing.assert_close(m0[1][~valid], torch.full_like(m0[1][~valid], 1 - 0.5 / R))


def test_train_view_pads_both_ways_and_flip_moves_the_right_padding_left():
    # no resize, 30 x 20 into a 40 x 32 crop: the crop is the whole image, padded 10 rows and 12 columns
    img, lbl = np.zeros((30, 20, 3), np.uint8), np.zeros((30, 20), np.uint8)
    for flip, box in [(0.0, (0.0, 0.0, 40 / 30, 32 / 20, 0.0)), (1.0, (0.0, -12 / 20, 40 / 30, 1.0, 1.0))]:
        t = TrainTransform(crop_size=(40, 32), flip_prob=flip, photometric=False)
        out, _, view = t(img, lbl, np.random.default_rng(0), return_view=True)
        assert out.shape == (40, 32, 3) and view == pytest.approx(box)
    # no crop: the whole image, only the flip flag
    _, _, view = TrainTransform(scale=(100, 50), flip_prob=1.0, photometric=False)(img, lbl, np.random.default_rng(0),
                                                                                  return_view=True)
    assert view == (0.0, 0.0, 1.0, 1.0, 1.0)


def test_dataset_items_and_batches_carry_views(synthetic_root):
    from segprompt.data.dataset import SegDataset, collate
    from segprompt.data.meta import read_meta

    meta = read_meta(synthetic_root)
    tf = TrainTransform(scale=(64, 64), ratio_range=(0.75, 1.25), crop_size=(48, 48))
    train = SegDataset(synthetic_root, "train", meta, train_transform=tf)
    items = [train[(i, 10 + i)] for i in range(3)]
    batch = collate(items)
    assert batch["view"].shape == (3, 5) and batch["view"].dtype == torch.float32
    for i, item in enumerate(items):
        _, _, view = tf(*train.load(i), np.random.default_rng(10 + i), return_view=True)
        assert torch.equal(item["view"], torch.tensor(view, dtype=torch.float32))
    assert not torch.equal(batch["view"], identity_view(3))
    test = SegDataset(synthetic_root, "val", meta)
    assert torch.equal(collate([test[0], test[1]])["view"], identity_view(2))


# (2) sliding windows and flip TTA


def test_slide_windows_get_their_part_of_m0_and_flip_tta_a_mirrored_m0():
    model = _model()
    seen = _record_m0(model)
    stride_of_stage1 = 4  # the ResNet stem
    # 40 x 56 with 32 x 32 windows, stride (16, 24): y windows 0-32, 8-40; x windows 0-32, 24-56
    img = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    slide_inference(model, img, (40, 56), crop_size=(32, 32), stride=(16, 24), batch_size=3)
    boxes = [(y / 40, x / 56, (y + 32) / 40, (x + 32) / 56, 0.0) for y in (0, 8) for x in (0, 24)]
    maps = torch.cat(seen)
    assert maps.shape == (4, K, 8, 8)
    for m, box in zip(maps, boxes):
        ys, xs = _coords(box, (32 // stride_of_stage1, 32 // stride_of_stage1))
        torch.testing.assert_close(m[0], _clamp(xs), atol=1e-6, rtol=0)
        torch.testing.assert_close(m[1], _clamp(ys), atol=1e-6, rtol=0)

    # a window larger than the image: padded below, its box reaches past 1 (M0's edge repeats)
    seen.clear()
    small = torch.randn(2, 3, 24, 32, dtype=torch.float64)
    slide_inference(model, small, (24, 32), crop_size=(32, 32), stride=(16, 16))
    assert len(seen) == 1 and seen[0].shape == (2, K, 8, 8)
    ys, xs = _coords((0.0, 0.0, 32 / 24, 1.0, 0.0), (8, 8))
    for m in seen[0]:
        torch.testing.assert_close(m[1], _clamp(ys), atol=1e-6, rtol=0)
        torch.testing.assert_close(m[0], _clamp(xs), atol=1e-6, rtol=0)

    # flip TTA: the flipped pass gets M0 mirrored, in whole and slide mode
    for mode, kw in (("whole", {}), ("slide", {"crop_size": (32, 32), "stride": (16, 24)})):
        seen.clear()
        inference(model, img, (40, 56), mode=mode, flip=True, **kw)
        maps = torch.cat(seen)
        plain, flipped = maps[: len(maps) // 2], maps[len(maps) // 2:]
        assert len(plain) == len(flipped) == (1 if mode == "whole" else 4)
        if mode == "whole":
            torch.testing.assert_close(flipped[0], plain[0].flip(-1), atol=1e-6, rtol=0)
            _, xs = _coords((0.0, 0.0, 1.0, 1.0, 1.0), plain[0].shape[-2:])
            torch.testing.assert_close(flipped[0][0], _clamp(xs), atol=1e-6, rtol=0)
        else:  # window x = 0 of the flipped image is the mirror of window x = 24 of the original
            for a, b in ((0, 1), (1, 0), (2, 3), (3, 2)):
                torch.testing.assert_close(flipped[a], plain[b].flip(-1), atol=1e-6, rtol=0)


def test_sub_view_composes_windows_of_flipped_inputs():
    flipped = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    # the left quarter of a mirrored image is the right quarter of the original, still mirrored
    torch.testing.assert_close(sub_view(flipped, (0.0, 0.0, 0.5, 0.25)), torch.tensor([[0.0, 0.75, 0.5, 1.0, 1.0]]))
    crop = torch.tensor([[0.2, 0.4, 0.6, 0.8, 0.0]])
    torch.testing.assert_close(sub_view(crop, (0.5, 0.5, 1.5, 1.0)), torch.tensor([[0.4, 0.6, 0.8, 0.8, 0.0]]))


def test_every_model_call_gets_the_view_of_its_input():
    calls = []

    def viewed(x, *, view=None):
        calls.append(tuple(view.shape))
        return x[:, :K]

    img = torch.randn(1, 8, 10, 12)
    inference(viewed, img, (10, 12), mode="slide", crop_size=(8, 8), stride=(4, 4), batch_size=2)
    inference(viewed, img, (10, 12))
    assert calls == [(2, 5), (2, 5), (1, 5)]  # 2 x 2 windows in calls of 2, then the whole image


# (3) the identity view is the old behaviour, bit for bit


def test_identity_view_gives_bitwise_the_old_output():
    model = _model(stages=(1, 2, 5))
    img = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    old = model(img)  # no view: the stored M0 as before
    assert torch.equal(model(img, view=identity_view(2)), old)
    assert torch.equal(model(img, view=identity_view(1)[0]), old)
    assert torch.equal(inference(model, img, (32, 40)), old)  # whole mode passes the identity view
    # one window covering the image has the identity view too
    assert torch.equal(slide_inference(model, img, (32, 40), crop_size=(32, 40), stride=(16, 16), batch_size=2), old)
    # M0 matters: another view changes the output, and in a mixed batch the identity row stays as it was
    view = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.1, 0.2, 0.6, 0.9, 1.0]])
    mixed = model(img, view=view)
    assert torch.equal(mixed[0], old[0])
    assert (mixed[1] - old[1]).abs().max() > 1e-9  # (this random frozen backbone damps M0's effect a lot)
    # the view does not outlive the forward
    assert model.backbone.stage_hook._view is None


def test_recognition_vector_prior_ignores_the_view():
    chain = SPMChain({}, torch.full((K,), 1 / K), {}, CrossEntropyLoss())
    chain.set_view(torch.tensor([[0.1, 0.2, 0.6, 0.9, 1.0]]))
    assert torch.equal(chain.initial_map(torch.zeros(1, 3, 4, 4)), torch.full((1, K), 1 / K))
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        chain.set_view(torch.zeros(2, 4))


# (4) training end to end


def test_spm_training_run_feeds_crop_views(tmp_path, synthetic_root, monkeypatch):
    from segprompt.training.launch import train

    views: list[torch.Tensor] = []
    set_view = SPMChain.set_view

    def record(self, view):
        if view is not None:
            views.append(view.clone())
        set_view(self, view)

    monkeypatch.setattr(SPMChain, "set_view", record)
    overrides = [f"data.root={synthetic_root}", "tuning.name=spm", "tuning.channels=16", "tuning.stages=[1,3,5]",
                 "tuning.prior_resolution=16", "data.batch_size=2", "runtime.device=cpu", "runtime.num_workers=0",
                 "schedule.iters=2", "schedule.warmup_iters=1", "evaluation.interval=2", "checkpoint.interval=2",
                 "evaluation.mode=slide", "evaluation.crop_size=[96,96]", "evaluation.stride=[64,64]",
                 "runtime.log_interval=1"]
    run = train("recipes/smoke.yaml", overrides, out=tmp_path / "run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) and "loss_spm5" in r for r in records if "loss" in r)
    assert "mIoU" in json.loads((run / "eval.json").read_text())
    train_views = [v for v in views if v.shape == (2, 5)]
    assert len(train_views) >= 2  # one per training step (batch 2), then the evaluation windows
    assert any(not torch.equal(v, identity_view(2)) for v in train_views)
