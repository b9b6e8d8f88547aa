"""Backbones (ResNetV1c, ViT), heads (PSP, SETR-UP), VPT and AdaptFormer.

The counts are those of ``docs/spm.md`` ("Backbones and heads as the paper counts them", "Baselines"),
built full size on the meta device.
ResNet-side tables count conv/linear weights and biases (no BatchNorm); ViT-side ones count
everything but BatchNorm (LayerNorm, cls token, position embedding). Checkpoint tests save random
weights in each supported naming and check that they load back exactly.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from conftest import recipe_from_dict
from timm.layers import resample_abs_pos_embed
from torch import nn

from segprompt.build import apply_tuning, build_segmentor
from segprompt.data.meta import DatasetMeta
from segprompt.errors import SegpromptError
from segprompt.models.backbones.resnet import ResNet
from segprompt.models.backbones.vit import VisionTransformer, resize_pos_embed
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.heads.psp import PSPHead
from segprompt.models.heads.setr_up import SETRUPHead
from segprompt.models.losses import CrossEntropyLoss
from segprompt.models.segmentor import EncoderDecoder
from segprompt.tuning import TuningContext
from segprompt.tuning.adaptformer import AdaptFormer
from segprompt.tuning.vpt import VPT

META = torch.device("meta")
BN = nn.BatchNorm2d
CONV_LINEAR = (nn.Conv2d, nn.Linear)


def params_of(module: nn.Module, kinds: tuple[type, ...]) -> int:
    """Parameters held directly by submodules of the given types."""
    return sum(p.numel() for m in module.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False))


def params_without_bn(module: nn.Module) -> int:
    return sum(p.numel() for m in module.modules() if not isinstance(m, BN) for p in m.parameters(recurse=False))


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def resnet101_d8(deep_stem: bool = True) -> ResNet:
    return ResNet(depth=101, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), deep_stem=deep_stem)


def aux_fcn(num_classes: int) -> FCNHead:
    return FCNHead(1024, num_classes, channels=256, num_convs=1, concat_input=False, in_index=2, loss_weight=0.4)


def setr_pup_heads(num_classes: int) -> list[SETRUPHead]:
    main = SETRUPHead(1024, num_classes, channels=256, num_convs=4, up_scale=2, in_index=3)
    return [main] + [SETRUPHead(1024, num_classes, channels=256, num_convs=2, up_scale=4, in_index=i,
                                loss_weight=0.4) for i in range(3)]


def tiny_vit(**kw) -> VisionTransformer:
    args = dict(img_size=64, embed_dim=32, depth=4, num_heads=4, out_indices=(1, 3))
    return VisionTransformer(**{**args, **kw})


# ----------------------------------------------------------------------------------------------
# Counts (docs/spm.md)


def test_resnet101_v1c_counts():
    with META:
        r = resnet101_d8()
    assert params_of(r, (nn.Conv2d,)) == 42_413_920
    assert params_of(r, (nn.Linear,)) == 0
    assert params_of(r, (BN,)) == 105_472
    assert sum(p.numel() for n, p in r.named_parameters() if n.endswith(".bias")) == 52_736
    assert params_of(r.stem, CONV_LINEAR) == 28_512
    assert [params_of(s, CONV_LINEAR) for s in r.stages] == [212_992, 1_212_416, 26_017_792, 14_942_208]
    assert r.slot_channels == [64, 256, 512, 1024, 2048]
    assert r.feature_channels == [256, 512, 1024, 2048]
    with META:
        assert params_of(resnet101_d8(deep_stem=False), CONV_LINEAR) == 42_394_816  # "42.39M, not 42.41M"


@pytest.mark.parametrize("k, total", [(150, 25_543_468), (6, 25_432_588)])
def test_psp_head_with_aux_fcn_count(k, total):
    with META:
        heads = nn.ModuleList([PSPHead(2048, k), aux_fcn(k)])
    assert params_of(heads, CONV_LINEAR) == 25_427_968 + 770 * k == total


def test_retinal_pup_head_count():
    with META:
        heads = nn.ModuleList([SETRUPHead(2048, 2, channels=256, num_convs=3, up_scale=2), aux_fcn(2)])
    assert params_of(heads, CONV_LINEAR) == 8_258_564
    assert params_of(heads, (nn.LayerNorm,)) == 4_096
    assert params_of(heads, (BN,)) == 2_048


@pytest.mark.parametrize("img_size, total", [(512, 304_147_456), (384, 303_688_704), (768, 305_458_176)])
def test_vit_l16_count(img_size, total):
    with META:
        vit = VisionTransformer(img_size=img_size)
    assert sum(p.numel() for p in vit.parameters()) == total
    assert sum(p.numel() for p in vit.blocks[0].parameters()) == 12_596_224
    assert vit.slot_channels == [1024, 1024] and vit.feature_channels == [1024] * 4


def test_setr_pup_head_count():
    with META:
        heads = nn.ModuleList(setr_pup_heads(150))
    assert params_without_bn(heads) == 13_138_520


def _vit_l_model(method) -> EncoderDecoder:
    with META:
        model = EncoderDecoder(VisionTransformer(), setr_pup_heads(150)[0])
    method.apply(model, TuningContext(num_classes=150))
    return model


def test_vpt_and_adaptformer_counts():
    assert trainable(_vit_l_model(VPT()).backbone) == 245_760
    vpt_bias = _vit_l_model(VPT(num_tokens=100, bias=True)).backbone
    assert vpt_bias.prompt_tokens.numel() == 2_457_600
    assert trainable(vpt_bias) == 2_457_600 + 271_360
    adapted = _vit_l_model(AdaptFormer()).backbone
    assert sum(p.numel() for p in adapted.blocks[0].adapter.parameters()) == 132_160
    assert trainable(adapted) == 3_171_840


# ----------------------------------------------------------------------------------------------
# ResNet checkpoints


def _mmseg_resnet_keys(blocks: tuple[int, ...]) -> list[str]:
    """The state-dict names of MMSegmentation's ResNetV1c (deep stem, bottlenecks) plus its classifier."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = [f"stem.{i}.weight" for i in (0, 3, 6)] + [f"stem.{i}.{b}" for i in (1, 4, 7) for b in bn]
    for s, n in enumerate(blocks, 1):
        for j in range(n):
            for c in (1, 2, 3):
                keys += [f"layer{s}.{j}.conv{c}.weight"] + [f"layer{s}.{j}.bn{c}.{b}" for b in bn]
            if j == 0:
                keys += [f"layer{s}.0.downsample.0.weight"] + [f"layer{s}.0.downsample.1.{b}" for b in bn]
    return keys + ["fc.weight", "fc.bias"]


def _random_like(t: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 100, t.shape) if t.dtype == torch.long else torch.randn(t.shape)


@pytest.mark.parametrize("wrap", ["plain", "state_dict+backbone"])
def test_mmseg_resnet_checkpoint_round_trip(tmp_path, wrap):
    model = ResNet(depth=50, base_channels=8, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    own = model.state_dict()
    keys = _mmseg_resnet_keys((3, 4, 6, 3))
    assert set(keys) - {"fc.weight", "fc.bias"} == set(own)
    state = {k: _random_like(own[k]) for k in keys if k in own}
    state.update({"fc.weight": torch.randn(1000, 256), "fc.bias": torch.randn(1000)})
    if wrap != "plain":
        state = {"meta": {"epoch": 100}, "state_dict": {f"backbone.{k}": v for k, v in state.items()}}
    torch.save(state, tmp_path / "r50_v1c.pth")
    model.load_pretrained(tmp_path / "r50_v1c.pth")
    src = state if wrap == "plain" else {k[len("backbone."):]: v for k, v in state["state_dict"].items()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, src[k]), k


@pytest.mark.parametrize("arch, depth", [("resnet18", 18), ("resnet50", 50)])
def test_torchvision_resnet_checkpoint_round_trip(tmp_path, arch, depth):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None).eval()
    for m in tv.modules():
        if isinstance(m, BN):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    state = tv.state_dict()
    # torchvision's ImageNet files predate BatchNorm's num_batches_tracked counter
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / f"{arch}.pth")
    ours = ResNet(depth=depth, deep_stem=False).eval()
    ours.load_pretrained(tmp_path / f"{arch}.pth")
    for k, v in ours.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, state[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        refs = []
        for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            ref = layer(ref)
            refs.append(ref)
        outs = ours(x)
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b)


def test_resnet_checkpoint_errors(tmp_path):
    model = ResNet(depth=18, base_channels=8)
    with pytest.raises(SegpromptError, match=r"do not exist\. Put the resnet checkpoint file there"):
        model.load_pretrained(tmp_path / "nowhere.pth")

    state = dict(model.state_dict())
    del state["layer1.0.conv1.weight"]
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(10, 64)  # the classifier is dropped, never reported
    state["stem.0.weight"] = torch.zeros(1, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(SegpromptError) as e:
        model.load_pretrained(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "do not fit backbone 'resnet': 1 missing keys ['layer1.0.conv1.weight']" in msg
    assert "1 unexpected keys ['layer9.0.conv1.weight']" in msg
    assert "stem.0.weight (1, 3, 3, 3) vs (4, 3, 3, 3)" in msg
    assert "fc.weight" not in msg

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(SegpromptError, match="set model.backbone.deep_stem: false"):
        ResNet(depth=18).load_pretrained(tmp_path / "tv.pth")


# ----------------------------------------------------------------------------------------------
# ViT checkpoints


def _timm_vit(img_size: int) -> nn.Module:
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=32, depth=4, num_heads=4, qkv_bias=True, num_classes=10)
    with torch.no_grad():
        vit.pos_embed.normal_()
        for n, p in vit.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    return vit.eval()


def _to_mmseg_name(k: str) -> str:
    """timm -> MMSegmentation (its vit2mmseg converter's renaming)."""
    if k.startswith("norm."):
        return "ln1." + k[len("norm."):]
    for a, b in [("patch_embed.proj.", "patch_embed.projection."), ("blocks.", "layers."),
                 (".norm1.", ".ln1."), (".norm2.", ".ln2."), (".attn.qkv.weight", ".attn.attn.in_proj_weight"),
                 (".attn.qkv.bias", ".attn.attn.in_proj_bias"), (".attn.proj.", ".attn.attn.out_proj."),
                 (".mlp.fc1.", ".ffn.layers.0.0."), (".mlp.fc2.", ".ffn.layers.1.")]:
        k = k.replace(a, b)
    return k


def test_timm_vit_checkpoint_same_grid_matches_timm(tmp_path):
    ref = _timm_vit(48)
    state = dict(ref.state_dict())
    state["pre_logits.fc.weight"] = torch.zeros(32, 32)  # classifier side, dropped
    torch.save({"model": state}, tmp_path / "vit.pth")
    ours = tiny_vit(img_size=48).eval()
    ours.load_pretrained(tmp_path / "vit.pth")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, indices=[1, 3], norm=False, output_fmt="NCHW",
                                             intermediates_only=True)
        outs = ours(x)
    assert [o.shape for o in outs] == [(2, 32, 3, 3)] * 2
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_timm_vit_checkpoint_resizes_position_embedding(tmp_path):
    ref = _timm_vit(48)  # 3x3 grid, loaded into a 64x64 model (4x4 grid)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    ours = tiny_vit()
    ours.load_pretrained(tmp_path / "vit.pth")
    expected_pos = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=[4, 4], old_size=[3, 3],
                                          num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    assert ours.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(ours.pos_embed.detach(), expected_pos)
    src = ref.state_dict()
    for k, v in ours.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, src[k]), k
    # an input of another size resizes the (loaded) embedding on the fly
    with torch.no_grad():
        assert [o.shape for o in ours(torch.randn(1, 3, 80, 40))] == [(1, 32, 5, 3)] * 2


def test_mmseg_vit_checkpoint_matches_timm_one(tmp_path):
    ref = _timm_vit(48)
    timm_state = ref.state_dict()
    mm_state = {"backbone." + _to_mmseg_name(k): v for k, v in timm_state.items() if not k.startswith("head.")}
    assert "backbone.layers.0.attn.attn.in_proj_weight" in mm_state and "backbone.ln1.weight" in mm_state
    torch.save({"state_dict": mm_state}, tmp_path / "mm.pth")
    torch.save(timm_state, tmp_path / "timm.pth")
    a, b = tiny_vit(), tiny_vit()
    a.load_pretrained(tmp_path / "mm.pth")
    b.load_pretrained(tmp_path / "timm.pth")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    # the renaming is exact: nn.MultiheadAttention with MMSegmentation's weights == our attention
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    mha.load_state_dict({k.split("attn.attn.")[1]: v for k, v in mm_state.items()
                         if k.startswith("backbone.layers.0.attn.attn.")})
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.blocks[0].attn(x), mha(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_vit_checkpoint_errors(tmp_path):
    with pytest.raises(SegpromptError, match="do not exist"):
        tiny_vit().load_pretrained(tmp_path / "missing.pth")
    state = dict(tiny_vit().state_dict())
    del state["blocks.2.mlp.fc1.bias"]
    state["blocks.2.mlp.fc3.bias"] = torch.zeros(32)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(SegpromptError, match=r"backbone 'vit': 1 missing keys \['blocks\.2\.mlp\.fc1\.bias'\], "
                                             r"1 unexpected keys \['blocks\.2\.mlp\.fc3\.bias'\]"):
        tiny_vit().load_pretrained(tmp_path / "bad.pth")


# ----------------------------------------------------------------------------------------------
# ViT stage hooks


class _Recorder(nn.Module):
    def __init__(self, log: list, add: dict[int, float] | None = None):
        super().__init__()
        self.log, self.add = log, add or {}

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        self.log.append(("hook", i, tuple(x.shape)))
        return x + self.add.get(i, 0.0)


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_vit_stage_hooks(num_stages):
    vit = VisionTransformer(img_size=64, embed_dim=16, depth=12, num_heads=2, out_indices=(5, 11),
                            num_stages=num_stages).eval()
    assert vit.slot_channels == [16] * (num_stages + 1) and vit.stage_in_channels == [16] * num_stages
    assert [len(s) for s in vit.stages] == [12 // num_stages] * num_stages
    x = torch.randn(2, 3, 48, 32)  # a 3x2 token grid
    with torch.no_grad():
        plain = vit(x)
    log: list = []
    for j, block in enumerate(vit.blocks):
        block.register_forward_pre_hook(lambda m, args, j=j: log.append(("block", j)))
    vit.stage_hook = _Recorder(log)
    with torch.no_grad():
        hooked = vit(x)
    per = 12 // num_stages
    expected = []
    for j in range(12):
        if j % per == 0:
            expected.append(("hook", j // per, (2, 16, 3, 2)))
        expected.append(("block", j))
    assert log == expected + [("hook", num_stages, (2, 16, 3, 2))]
    for a, b in zip(hooked, plain):
        assert torch.equal(a, b)

    # what the hook returns is what the network continues with; the cls token passes by unchanged
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    vit.stage_hook = _Recorder([], add={0: 1.0, num_stages: -1e9})
    with torch.no_grad():
        outs = vit(x)
    tokens = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(x).flatten(2).transpose(1, 2)], 1)
    tokens = tokens + resize_pos_embed(vit.pos_embed, vit.grid_size, (3, 2), "bicubic")
    torch.testing.assert_close(seen["x"][:, 0], tokens[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(seen["x"][:, 1:], tokens[:, 1:] + 1.0)
    assert (outs[-1] < -1e8).all()


# ----------------------------------------------------------------------------------------------
# VPT / AdaptFormer training


def _tiny_vit_segmentor(num_classes: int = 3) -> EncoderDecoder:
    torch.manual_seed(0)
    loss = CrossEntropyLoss()
    main = SETRUPHead(32, num_classes, channels=8, num_convs=2, up_scale=2, loss=loss)
    aux = SETRUPHead(32, num_classes, channels=8, num_convs=1, up_scale=4, in_index=0, loss_weight=0.4, loss=loss)
    return EncoderDecoder(tiny_vit(), main, [aux])


def _trains(name: str, method: str) -> bool:
    if not name.startswith("backbone."):
        return True  # heads
    if method == "vpt":
        return name == "backbone.prompt_tokens"
    if method == "vpt_bias":
        return name == "backbone.prompt_tokens" or name.endswith(".bias")
    return ".adapter." in name


@pytest.mark.parametrize("method", ["vpt", "vpt_bias", "adaptformer"])
def test_vpt_adaptformer_train_only_their_parameters(method):
    model = _tiny_vit_segmentor()
    img, label = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    if method == "adaptformer":
        model.eval()
        with torch.no_grad():
            before = model(img)
    tuner = {"vpt": VPT(), "vpt_bias": VPT(num_tokens=3, bias=True), "adaptformer": AdaptFormer()}[method]
    tuner.apply(model, TuningContext(num_classes=3))
    if method == "adaptformer":  # the up-projection starts at zero: the tuned model starts as the frozen one
        with torch.no_grad():
            torch.testing.assert_close(model(img), before)
    names = dict(model.named_parameters())
    assert {n for n, p in names.items() if p.requires_grad} == {n for n in names if _trains(n, method)}
    model.train()
    sum(model(img, label).values()).backward()
    for n, p in names.items():
        assert (p.grad is not None) == _trains(n, method), n
    frozen = {n: p.detach().clone() for n, p in names.items() if not p.requires_grad}
    inserted = {n: p.detach().clone() for n, p in names.items()
                if n == "backbone.prompt_tokens" or ".adapter.up_proj." in n}
    assert inserted
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=1e-4)
    opt.step()
    for n, v in frozen.items():
        assert torch.equal(names[n], v), n
    for n, v in inserted.items():
        assert not torch.equal(names[n], v), n


def test_vpt_needs_a_vit():
    model = EncoderDecoder(ResNet(depth=18, base_channels=8), FCNHead(64, 3, channels=8))
    for method in (VPT(), AdaptFormer()):
        with pytest.raises(SegpromptError, match="model.backbone.name: vit"):
            method.apply(model, TuningContext(num_classes=3))


# ----------------------------------------------------------------------------------------------
# Forward shapes and the recipe path


def test_resnet_psp_and_retinal_pup_shapes():
    torch.manual_seed(0)
    backbone = ResNet(depth=50, base_channels=8, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    c = backbone.feature_channels
    psp = PSPHead(c[-1], 5, channels=16, loss=CrossEntropyLoss())
    pup = SETRUPHead(c[-1], 5, channels=16, num_convs=3, up_scale=2)
    aux = FCNHead(c[2], 5, channels=8, num_convs=1, concat_input=False, in_index=2, loss_weight=0.4,
                  loss=CrossEntropyLoss())
    model = EncoderDecoder(backbone, psp, [aux])
    img = torch.randn(2, 3, 64, 64)
    feats = backbone(img)
    assert psp(feats).shape == (2, 5, 8, 8)
    assert pup(feats).shape == (2, 5, 64, 64)  # three x2 steps bring stride 8 back to full resolution
    assert model(img).shape == (2, 5, 64, 64)
    assert set(model(img, torch.randint(0, 5, (2, 64, 64)))) == {"loss_seg", "loss_aux0"}
    assert ResNet(depth=18, base_channels=8, deep_stem=False)(img)[-1].shape == (2, 64, 2, 2)


def test_vit_setr_shapes():
    model = _tiny_vit_segmentor(num_classes=4).eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(img)
        assert [f.shape for f in feats] == [(2, 32, 4, 4)] * 2
        assert model.decode_head(feats).shape == (2, 4, 16, 16)
        assert model.aux_heads[0](feats).shape == (2, 4, 16, 16)
        assert model(img).shape == (2, 4, 64, 64)


def test_recipe_builds_vit_with_pretrained_weights_and_vpt(tmp_path):
    ref = _timm_vit(48)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    recipe = recipe_from_dict({
        "model": {"backbone": {"name": "vit", "img_size": 64, "embed_dim": 32, "depth": 4, "num_heads": 4,
                               "out_indices": [1, 3], "num_stages": 2},
                  "decode_head": {"name": "setr_up", "channels": 8, "num_convs": 2, "up_scale": 2, "in_index": 1},
                  "aux_heads": [{"name": "setr_up", "channels": 8, "in_index": 0, "loss_weight": 0.4},
                                {"name": "psp", "channels": 8, "pool_scales": [1, 2], "in_index": 0}],
                  "pretrained": str(tmp_path / "vit.pth")},
        "tuning": {"name": "vpt", "num_tokens": 2, "bias": True},
    }, tmp_path)
    meta = DatasetMeta(name="synthetic", classes=["a", "b", "c"], palette=[[0, 0, 0]] * 3)
    model = build_segmentor(recipe, meta)
    apply_tuning(model, recipe, TuningContext(num_classes=3))
    assert torch.equal(model.backbone.blocks[3].mlp.fc2.weight, ref.blocks[3].mlp.fc2.weight)
    assert model.backbone.prompt_tokens.shape == (4, 2, 32)
    assert model.decode_head.norm.normalized_shape == (32,)
    with pytest.raises(SegpromptError, match="unknown key 'model.backbone.out_indice'"):
        recipe_from_dict({"model": {"backbone": {"name": "vit", "out_indice": [1]}}}, tmp_path)
