"""STDC-Seg: STDC network, context path, text-guidance hook, detail head, OHEM and FLOP counting.

The parameter and FLOP figures are those of ``docs/stdc_clip.md`` ("Parameters and FLOPs"), built full size
on the meta device. The text module is a stand-in with TextGuidance's interface (a fixed K x 1024
embedding and a cosine score map), installed as ``segprompt.models.text.guidance`` for the test.
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import recipe_from_dict
from torch import nn

from segprompt.build import build_segmentor, load_backbone_weights
from segprompt.data.meta import DatasetMeta
from segprompt.errors import SegpromptError
from segprompt.measure.flops import mmcv_flops, torch_flops
from segprompt.models.backbones.stdc import STDCContextPath, STDCNet
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.heads.stdc_detail import DetailHead, detail_target
from segprompt.models.losses import CrossEntropyLoss, OhemCrossEntropyLoss
from segprompt.models.segmentor import EncoderDecoder

META = torch.device("meta")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class StandInTextGuidance(nn.Module):
    """TextGuidance's interface: K fixed class embeddings, S = cosine(F4, T) per pixel."""

    def __init__(self, class_names: list[str], dim: int = 1024, seed: int = 0):
        super().__init__()
        self.num_classes = len(class_names)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("embeddings", torch.randn(self.num_classes, dim, generator=g))

    def forward(self, f4: torch.Tensor) -> torch.Tensor:
        t = F.normalize(self.embeddings.to(f4.dtype), dim=1)
        return torch.einsum("kc,bchw->bkhw", t, F.normalize(f4, dim=1))


@pytest.fixture()
def text_module(monkeypatch):
    mod = types.ModuleType("segprompt.models.text.guidance")
    mod.TextGuidance = StandInTextGuidance
    monkeypatch.setitem(sys.modules, "segprompt.models.text.guidance", mod)
    return mod


def stdc_seg(num_classes: int, training: bool = True, **backbone) -> EncoderDecoder:
    """STDC1-Seg as the paper's recipe builds it: decode FCN 256 (1 conv) on ffm_out, auxiliary FCNs
    128 -> 64 on feat16_up and feat32_up, detail head on feat8."""
    k = num_classes
    aux = [FCNHead(128, k, channels=64, num_convs=1, concat_input=False, in_index=1),
           FCNHead(128, k, channels=64, num_convs=1, concat_input=False, in_index=2),
           DetailHead(256, k, in_index=0)] if training else []
    return EncoderDecoder(STDCContextPath("stdc1", **backbone),
                          FCNHead(256, k, channels=256, num_convs=1, concat_input=False, dropout=0.1, in_index=3),
                          aux, align_corners=True)


# ----------------------------------------------------------------------------------------------
# Shapes and parameter counts


@pytest.mark.parametrize("variant", ["stdc1", "stdc2"])
def test_stdcnet_and_context_path_shapes(variant):
    torch.manual_seed(0)
    img = torch.randn(2, 3, 64, 128)
    net = STDCNet(variant)
    feats = net(img)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 32, 64), (2, 64, 16, 32), (2, 256, 8, 16),
                                               (2, 512, 4, 8), (2, 1024, 2, 4)]
    assert net.feature_channels == [f.shape[1] for f in feats]
    assert (feats[-1] >= 0).all()  # F4 is post-ReLU (or pooled post-ReLU)
    assert not any(n.startswith(("conv_last", "fc", "linear", "bn.")) for n, _ in net.named_parameters())
    cp = STDCContextPath(variant)
    outs = cp(img)
    assert [tuple(o.shape) for o in outs] == [(2, 256, 8, 16), (2, 128, 8, 16), (2, 128, 4, 8), (2, 256, 8, 16)]
    assert cp.feature_channels == [o.shape[1] for o in outs]
    # 720x960 style sizes (H/32 not an integer) are handled by the explicit upsampling sizes
    cp.eval()
    with torch.no_grad():
        assert [tuple(o.shape[-2:]) for o in cp(torch.randn(1, 3, 72, 96))] == [(9, 12), (9, 12), (5, 6), (9, 12)]


def test_parameter_counts_match_the_paper():
    with META:
        net = STDCNet("stdc1")
        full = stdc_seg(19)
        infer = stdc_seg(19, training=False)
        full11 = stdc_seg(11)
        stdc2 = STDCNet("stdc2")
    assert round(n_params(net) / 1e6, 3) == 5.318
    assert round(n_params(full) / 1e6, 3) == 8.573
    assert round(n_params(infer) / 1e6, 3) == 8.275
    assert round(n_params(full11) / 1e6, 3) == 8.570
    assert n_params(stdc2) > n_params(net)
    # each auxiliary FCN is 0.075M and the detail head 0.148M
    assert round(n_params(full.aux_heads[0]) / 1e6, 3) == 0.075
    assert round(n_params(full.aux_heads[2]) / 1e6, 3) == 0.148


@pytest.mark.parametrize("k", [19, 11])
def test_text_guidance_adds_k_times_1280_parameters(text_module, k):
    names = [f"class{i}" for i in range(k)]
    with META:
        plain = stdc_seg(k)
        text = stdc_seg(k, text={}, class_names=names)
    assert n_params(text) - n_params(plain) == k * 1280
    assert text.backbone.arm32.conv.conv.in_channels == 1024 + k
    assert text.backbone.conv_avg.conv.in_channels == 1024 + k
    assert text.backbone.feature_channels == [256, 128, 128, 256, k]


def test_text_score_map_is_appended_and_feeds_the_context(text_module):
    torch.manual_seed(0)
    cp = STDCContextPath("stdc1", text={"seed": 1}, class_names=["road", "car", "sky"]).eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = cp(img)
        feat32 = cp.stdc(img)[-1]
        assert len(outs) == 5 and outs[4].shape == (1, 3, 2, 2)
        torch.testing.assert_close(outs[4], cp.text_guidance(feat32))
        assert outs[4].abs().max() <= 1 + 1e-6  # plain cosine, no temperature
        # other class embeddings change the context path (S enters arm32/conv_avg) but not feat8
        cp.text_guidance.embeddings.copy_(torch.randn(3, 1024))
        outs2 = cp(img)
    assert torch.equal(outs[0], outs2[0])
    assert not torch.allclose(outs[2], outs2[2])
    with pytest.raises(SegpromptError, match="class names"):
        STDCContextPath("stdc1", text={})


def test_recipe_builds_stdc_seg_and_trains_one_step(tmp_path):
    recipe = recipe_from_dict({
        "model": {"backbone": {"name": "stdc", "variant": "stdc1"},
                  "decode_head": {"name": "fcn", "channels": 256, "num_convs": 1, "concat_input": False,
                                  "in_index": 3},
                  "aux_heads": [{"name": "fcn", "channels": 64, "num_convs": 1, "concat_input": False, "in_index": 1},
                                {"name": "fcn", "channels": 64, "num_convs": 1, "concat_input": False, "in_index": 2},
                                {"name": "stdc_detail", "in_index": 0}],
                  "align_corners": True},
        "loss": {"name": "ohem_cross_entropy", "mode": "mmseg-fork"},
    }, tmp_path)
    meta = DatasetMeta(name="synthetic", classes=["a", "b", "c"], palette=[[0, 0, 0]] * 3)
    model = build_segmentor(recipe, meta)
    assert [h.conv_seg.in_channels for h in model.aux_heads] == [64, 64, 64]
    assert model.aux_heads[2].conv.conv.in_channels == 256
    img, label = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    label[:, :4] = 255
    losses = model(img, label)
    assert set(losses) == {"loss_seg", "loss_aux0", "loss_aux1", "loss_aux2"}
    sum(losses.values()).backward()
    assert model.backbone.stdc.stages[0].conv.weight.grad.abs().sum() > 0
    assert model.aux_heads[2].conv_seg.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(img).shape == (2, 3, 64, 64)
    with pytest.raises(SegpromptError, match="variant"):
        recipe_from_dict({"model": {"backbone": {"name": "stdc", "variant": "stdc3"}}}, tmp_path)


# ----------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("k, size, gflops", [(19, (512, 1024), 16.95), (19, (720, 960), 22.42)])
def test_mmcv_flops_of_stdc1_seg(k, size, gflops):
    with META:
        model = stdc_seg(k)  # the auxiliary and detail heads exist but do not run
    assert round(mmcv_flops(model, (3, *size)) / 1e9, 2) == gflops
    with META:
        inference_only = stdc_seg(k, training=False)
    assert mmcv_flops(model, size) == mmcv_flops(inference_only, size)
    assert model.training  # the counter leaves the model's mode alone


def test_mmcv_flops_of_text_guided_stdc1_seg(text_module):
    with META:
        model = stdc_seg(19, training=False, text={}, class_names=[str(i) for i in range(19)])
    assert round(mmcv_flops(model, (512, 1024)) / 1e9, 2) == 16.96
    assert round(mmcv_flops(model, (720, 960)) / 1e9, 2) == 22.44


def test_torch_flops_counts_two_per_conv_mac():
    with META:
        model = stdc_seg(19, training=False)
    assert round(torch_flops(model, (512, 1024)) / 2e9, 2) == 16.86  # pure conv MACs


class _Toy(nn.Module):
    def __init__(self, on_meta_fails: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # with bias
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        self.gate = nn.Sigmoid()
        self.on_meta_fails = on_meta_fails

    def forward(self, x):
        if self.on_meta_fails:
            float(x.sum())  # data-dependent: impossible on the meta device
        y = self.relu(self.bn(self.conv(x)))
        y = F.interpolate(y, scale_factor=2.0) * self.gate(y).mean()  # functional ops: not counted
        return self.fc(self.pool(y).flatten(1))


@pytest.mark.parametrize("on_meta_fails, built_on_meta", [(False, False), (True, False), (True, True)])
def test_mmcv_counting_rules(on_meta_fails, built_on_meta):
    """Counted on a meta copy, or (a data-dependent forward) on the model's device / a CPU copy."""
    with torch.device("meta" if built_on_meta else "cpu"):
        model = _Toy(on_meta_fails)
    out = 8 * 8  # 16x16 input, stride 2
    conv = 3 * 3 * 3 * 8 * out + 8 * out
    bn = 2 * 8 * out
    relu = 8 * out
    pool = 8 * 16 * 16  # input of the pool: the interpolated map
    fc = 8 * 5  # MMCV counts no bias for Linear
    assert mmcv_flops(model, (3, 16, 16)) == conv + bn + relu + pool + fc
    assert torch_flops(model, (16, 16)) == 2 * (3 * 3 * 3 * 8 * out + 8 * 5)
    with pytest.raises(ValueError, match="input_shape"):
        mmcv_flops(model, (16,))


# ----------------------------------------------------------------------------------------------
# Detail target and head


def _positive_laplacian(label: np.ndarray) -> np.ndarray:
    """8 x centre - 8 neighbours, zero padding, > 0."""
    p = np.pad(label.astype(np.float64), 1)
    h, w = label.shape
    neighbours = sum(p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - label
    return (8 * label - neighbours) > 0


def test_detail_target_marks_the_edges_of_two_rectangles():
    label = np.zeros((32, 32), np.int64)
    label[5:14, 4:20] = 3
    label[18:29, 10:27] = 7
    label[20:24, 12:16] = 255  # an ignored patch inside: its edges count (no ignore mask)
    target = detail_target(torch.from_numpy(label)[None])
    assert target.shape == (1, 1, 32, 32) and target.dtype == torch.float32
    t = target[0, 0].numpy().astype(bool)

    edge = _positive_laplacian(label)  # stride 1
    ys, xs = np.indices(label.shape)
    edge2 = edge[2 * (ys // 2), 2 * (xs // 2)]  # stride 2, nearest-upsampled
    np.testing.assert_array_equal(t, edge | edge2)  # stride 4 weighs 0.1: never above 0.1 alone

    # every marked pixel lies on or next to a class change; flat regions stay 0
    change = np.zeros_like(t)
    p = np.pad(label, 1, mode="edge")
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            change |= p[1 + dy:33 + dy, 1 + dx:33 + dx] != label
    near_change = change.copy()
    near_change[1:] |= change[:-1]
    near_change[:, 1:] |= near_change[:, :-1]
    assert not (t & ~near_change).any()
    assert t[5, 4:20].all() and t[13, 4:20].all() and t[5:14, 4].all() and t[5:14, 19].all()  # inner ring
    assert not t[7:12, 6:18].any() and not t[:3, 22:].any()  # rectangle and background interiors
    assert t[20, 12:16].all()  # the 255 patch's edge


def test_detail_target_of_flat_maps():
    assert detail_target(torch.zeros(2, 16, 16, dtype=torch.long)).sum() == 0
    flat = detail_target(torch.full((1, 16, 16), 2, dtype=torch.long))[0, 0]
    # zero padding makes the image border an edge of a non-zero class; the inside stays flat
    assert flat[0].all() and flat[:, 0].all() and flat[-1].all() and flat[:, -1].all()
    assert flat[2:-2, 2:-2].sum() == 0


def test_detail_head_loss():
    torch.manual_seed(0)
    # the original STDC code's Dice (sum p + sum t); the squared default: tests/test_conventions.py
    head = DetailHead(256, 19, in_index=0, align_corners=True, dice_denominator="linear")
    assert n_params(head) == 256 * 64 * 9 + 2 * 64 + 64  # 3x3 ConvBNReLU + bias-free 1x1
    feats = [torch.randn(2, 256, 8, 8, requires_grad=True)]
    logits = head(feats)
    assert logits.shape == (2, 1, 8, 8)
    label = torch.zeros(2, 64, 64, dtype=torch.long)
    label[:, 16:48, 16:48] = 1
    loss = head.loss(logits, label)
    up = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=True)
    t = detail_target(label)
    p = torch.sigmoid(up).flatten(1)
    dice = (1 - (2 * (p * t.flatten(1)).sum(1) + 1) / (p.sum(1) + t.flatten(1).sum(1) + 1)).mean()
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(up, t) + dice)
    loss.backward()
    assert feats[0].grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# OHEM


THRESH = -math.log(0.7)


def _logits_for_losses(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits (N, 2, 1, P) with label 0 whose per-pixel CE equals ``losses``."""
    z = torch.log(torch.expm1(losses))  # CE = log(1 + e^z) for logits (0, z), label 0
    logits = torch.stack([torch.zeros_like(z), z], dim=0)[None, :, None, :]
    return logits, torch.zeros(1, 1, losses.numel(), dtype=torch.long)


def test_ohem_original_keeps_at_least_min_kept():
    losses = torch.cat([torch.linspace(0.5, 2.0, 10), torch.linspace(0.01, 0.3, 90)]).double()
    logits, label = _logits_for_losses(losses)
    # 10 pixels above the threshold, quota 30: the top 30 are kept
    ohem = OhemCrossEntropyLoss(mode="original", min_kept=30)
    expected = losses.sort(descending=True).values[:30].mean()
    torch.testing.assert_close(ohem(logits, label).double(), expected, rtol=1e-5, atol=1e-6)
    # quota 5, 10 above: every pixel above the threshold is kept
    ohem = OhemCrossEntropyLoss(mode="original", min_kept=5)
    torch.testing.assert_close(ohem(logits, label).double(), losses[losses > THRESH].mean(), rtol=1e-5, atol=1e-6)
    # default quota: B*H*W // 16 = 6 -> all 10 above
    torch.testing.assert_close(OhemCrossEntropyLoss()(logits, label).double(), losses[:10].mean(),
                               rtol=1e-5, atol=1e-6)


def test_ohem_original_ranks_ignored_pixels_as_zero_loss():
    losses = torch.tensor([1.0, 0.8, 0.2, 0.1])
    logits, label = _logits_for_losses(losses)
    label[..., 2:] = 255
    # quota 3 of 2 valid pixels: the original's mean includes one ignored (zero) pixel
    loss = OhemCrossEntropyLoss(mode="original", min_kept=3)(logits, label)
    torch.testing.assert_close(loss, (losses[0] + losses[1]) / 3)


def test_ohem_mmseg_fork_is_plain_cross_entropy():
    torch.manual_seed(0)
    # the fork's batch (16 per process): min_kept = B*H*W/16, times B, covers every pixel
    logits = 3 * torch.randn(16, 5, 4, 4)
    label = torch.randint(0, 5, (16, 4, 4))
    label[0, :2] = 255
    ce = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    prob = logits.softmax(1).gather(1, label.clamp(max=4)[:, None])[:, 0].masked_fill(label == 255, -1)
    assert (prob > 0.7).sum() > 10
    top = prob == prob.max()  # all but the most confident pixel: MMSegmentation keeps prob < threshold
    fork = OhemCrossEntropyLoss(mode="mmseg-fork")(logits, label)
    torch.testing.assert_close(fork, (ce.sum() - ce[top].sum()) / ce.numel())
    assert abs(fork - CrossEntropyLoss()(logits, label)) < 0.36 / ce.numel()
    # when no pixel reaches 0.7 nothing is dropped, whatever the quota: exactly plain CE (ignore handled)
    logits = 0.3 * torch.randn(2, 5, 16, 16)
    label = torch.randint(0, 5, (2, 16, 16))
    label[0, :3] = 255
    plain = CrossEntropyLoss()(logits, label)
    torch.testing.assert_close(OhemCrossEntropyLoss(mode="mmseg-fork")(logits, label), plain)
    torch.testing.assert_close(OhemCrossEntropyLoss(mode="off")(logits, label), plain)


def test_ohem_mmseg_fork_with_a_small_quota_mines_hard_pixels():
    torch.manual_seed(1)
    logits = 3 * torch.randn(1, 4, 8, 8)
    label = torch.randint(0, 4, (1, 8, 8))
    prob = logits.softmax(1).gather(1, label[:, None])[:, 0]
    ce = F.cross_entropy(logits, label, reduction="none")
    ohem = OhemCrossEntropyLoss(mode="mmseg-fork", min_kept=40)  # x batch 1
    kth = prob.flatten().sort().values[40]
    keep = prob < max(kth.item(), 0.7)
    assert 40 <= keep.sum() < 64
    torch.testing.assert_close(ohem(logits, label), (ce * keep).sum() / 64)


def test_ohem_rejects_a_bad_mode():
    with pytest.raises(SegpromptError, match="mmseg-fork"):
        OhemCrossEntropyLoss(mode="mmseg")


# ----------------------------------------------------------------------------------------------
# ImageNet checkpoints


def _original_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our STDC1 keys as the original STDCNet813 names them (features.N, conv_list, avd_layer)."""
    block_index = {"2.0": 2, "2.1": 3, "3.0": 4, "3.1": 5, "4.0": 6, "4.1": 7}
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[1] in ("0", "1"):
            name = f"features.{parts[1]}." + ".".join(parts[2:])
        else:
            rest = ".".join(parts[3:]).replace("layers.", "conv_list.")
            rest = rest.replace("downsample.conv.", "avd_layer.0.").replace("downsample.bn.", "avd_layer.1.")
            name = f"features.{block_index[parts[1] + '.' + parts[2]]}.{rest}"
        out[name] = v
    return out


def _random_stdc1() -> STDCNet:
    torch.manual_seed(3)
    net = STDCNet("stdc1")
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
    return net


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_original_tar_with_classifier(tmp_path):
    ref = _random_stdc1()
    state = _original_names(ref.state_dict())
    assert "features.2.avd_layer.0.weight" in state and "features.7.conv_list.3.bn.running_var" in state
    state["x8.0.2.conv_list.0.conv.weight"] = state["features.2.conv_list.0.conv.weight"]  # the alias copies
    state.update({"conv_last.conv.weight": torch.randn(1024, 1024, 1, 1), "conv_last.bn.weight": torch.ones(1024),
                  "fc.weight": torch.randn(1024, 1024), "bn.weight": torch.ones(1024),
                  "bn.running_mean": torch.zeros(1024), "linear.weight": torch.randn(1000, 1024)})
    path = tmp_path / "STDCNet813M_73.91.tar"
    torch.save({"epoch": 300, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    backbone = STDCContextPath("stdc1")
    load_backbone_weights(backbone, str(path), "stdc")
    _assert_same(backbone.stdc, ref)


def test_load_mmseg_layout_and_report_bad_keys(tmp_path):
    ref = _random_stdc1()
    path = tmp_path / "stdc1_20220308-5368626c.pth"
    torch.save(ref.state_dict(), path)
    net = STDCNet("stdc1")
    net.load_pretrained(path)
    _assert_same(net, ref)

    extra = dict(ref.state_dict(), **{"stages.2.0.extra.weight": torch.zeros(1)})
    torch.save(extra, path)
    with pytest.raises(SegpromptError, match=r"1 unexpected keys \['stages.2.0.extra.weight'\]"):
        STDCNet("stdc1").load_pretrained(path)
    missing = {k: v for k, v in ref.state_dict().items() if not k.startswith("stages.4.1.layers.3.")}
    torch.save(missing, path)
    with pytest.raises(SegpromptError, match=r"5 missing keys \['stages.4.1.layers.3.bn.bias'"):
        STDCNet("stdc1").load_pretrained(path)
    torch.save(_original_names(ref.state_dict()), path)
    with pytest.raises(SegpromptError, match="variant: stdc1"):
        STDCNet("stdc2").load_pretrained(path)


def test_missing_pretrained_file_names_the_file(tmp_path):
    with pytest.raises(SegpromptError, match=r"pretrained/STDCNet813M_73\.91\.tar"):
        STDCContextPath("stdc1").load_pretrained(tmp_path / "nope.tar")
