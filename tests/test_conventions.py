"""The reference-code conventions of docs/conventions.md: which behaviour the paper recipes resolve
to, and that the other behaviour stays available as an option and computes what it says.

- §1 ViT position-embedding resize: SETR / ViT-L recipes bilinear, MAE ViT-B recipes bicubic.
- §2 STDC auxiliary FCN loss resize: ``loss_align_corners: false`` in the paper recipes; true differs.
- §3 STDC detail Dice: ``dice_denominator`` squared (default) vs linear, checked by hand.
- §4 frozen-backbone BatchNorm: ``bn_eval`` defaults (behaviour unchanged, documented).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segprompt.build import build_segmentor
from segprompt.config import load_recipe
from segprompt.data.meta import DatasetMeta
from segprompt.models import BACKBONES
from segprompt.models.backbones.vit import (
    VisionTransformer,
    load_vit_checkpoint,
    resize_pos_embed,
)
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.heads.stdc_detail import DetailHead, detail_target, dice_loss
from segprompt.models.losses import CrossEntropyLoss
from segprompt.tuning import METHODS

ROOT = Path(__file__).resolve().parents[1]
VITL_RECIPES = sorted((ROOT / "recipes/spm").glob("*vitl*.yaml"))
VITB_RECIPES = sorted(p for d in ("cifar100", "svhn", "food101") for p in (ROOT / "recipes/spm").glob(f"{d}_vitb_*.yaml"))
STDC_RECIPES = sorted((ROOT / "recipes/stdc").glob("*.yaml"))
META = DatasetMeta(name="synthetic", classes=["a", "b", "c"], palette=[[0, 0, 0]] * 3)
TINY_VIT = ["model.backbone.img_size=32", "model.backbone.patch_size=8", "model.backbone.embed_dim=16",
            "model.backbone.depth=4", "model.backbone.num_heads=2", "model.backbone.out_indices=[0,1,2,3]",
            "model.pretrained=null"]


# ----------------------------------------------------------------------------------------------
# §1 ViT position-embedding resize


def test_recipe_lists_are_not_empty():
    assert len(VITL_RECIPES) >= 8 and len(VITB_RECIPES) == 15 and len(STDC_RECIPES) >= 13


@pytest.mark.parametrize("path", VITL_RECIPES, ids=lambda p: p.stem)
def test_setr_vitl_recipes_resize_pos_embed_bilinearly(path):
    cfg = load_recipe(path)
    assert cfg.model.backbone["name"] == "vit"
    assert cfg.model.backbone["interpolate_mode"] == "bilinear"
    kwargs = {k: v for k, v in cfg.model.backbone.items() if k != "name"}
    with torch.device("meta"):  # full ViT-L, no memory
        vit = BACKBONES["vit"](**kwargs)
    assert vit.interpolate_mode == "bilinear" and vit.grid_size == (32, 32)


@pytest.mark.parametrize("path", VITB_RECIPES, ids=lambda p: p.stem)
def test_mae_vitb_recipes_keep_bicubic(path):
    assert load_recipe(path).model.backbone["interpolate_mode"] == "bicubic"


def test_built_setr_backbone_resizes_bilinearly():
    """The builder passes the recipe's mode to the backbone, which uses it at a new input size and
    when loading a checkpoint of another grid; ``bicubic`` stays an option and gives other values."""
    cfg = load_recipe(ROOT / "recipes/spm/ade20k_vitl_head.yaml", TINY_VIT)
    vit = build_segmentor(cfg, META, load_pretrained=False).backbone
    assert isinstance(vit, VisionTransformer) and vit.interpolate_mode == "bilinear"
    assert vit.grid_size == (4, 4)
    with torch.no_grad():
        vit.pos_embed.normal_()
    got = vit._pos_embed(6, 5)
    cls, grid = vit.pos_embed[:, :1], vit.pos_embed[:, 1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 5), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, torch.cat([cls, want], dim=1))
    bicubic = resize_pos_embed(vit.pos_embed, (4, 4), (6, 5), "bicubic")
    assert not torch.allclose(got, bicubic)

    cfg_b = load_recipe(ROOT / "recipes/spm/ade20k_vitl_head.yaml",
                        [*TINY_VIT, "model.backbone.interpolate_mode=bicubic"])
    vit_b = build_segmentor(cfg_b, META, load_pretrained=False).backbone
    assert vit_b.interpolate_mode == "bicubic"
    with torch.no_grad():
        vit_b.pos_embed.copy_(vit.pos_embed)
    torch.testing.assert_close(vit_b._pos_embed(6, 5), bicubic)


def test_checkpoint_pos_embed_resized_with_the_recipe_mode(tmp_path):
    src = VisionTransformer(img_size=48, patch_size=8, embed_dim=16, depth=2, num_heads=2, out_indices=(1,))
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    loaded = {}
    for mode in ("bilinear", "bicubic"):
        dst = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, out_indices=(1,),
                                interpolate_mode=mode)
        load_vit_checkpoint(dst, path)
        want = resize_pos_embed(src.pos_embed.detach(), (6, 6), (4, 4), mode)
        torch.testing.assert_close(dst.pos_embed.detach(), want)
        loaded[mode] = dst.pos_embed.detach()
    assert not torch.allclose(loaded["bilinear"], loaded["bicubic"])


# ----------------------------------------------------------------------------------------------
# §2 STDC auxiliary FCN losses


def _fcn_aux(cfg):
    return [h for h in cfg.model.aux_heads if h["name"] == "fcn"]


@pytest.mark.parametrize("path", STDC_RECIPES, ids=lambda p: p.stem)
def test_stdc_recipes_resolve_the_fork_conventions(path):
    cfg = load_recipe(path)
    assert cfg.model.align_corners is True  # main head loss, detail head and evaluation resize
    aux = _fcn_aux(cfg)
    assert len(aux) == 2 and all(h["loss_align_corners"] is False for h in aux)
    detail = [h for h in cfg.model.aux_heads if h["name"] == "stdc_detail"]
    assert len(detail) == 1 and detail[0]["dice_denominator"] == "squared"


def test_built_stdc_heads_resize_aux_losses_without_align_corners():
    cfg = load_recipe(ROOT / "recipes/stdc/cityscapes_stdc1_baseline.yaml", ["model.pretrained=null"])
    with torch.device("meta"):
        model = build_segmentor(cfg, META, load_pretrained=False)
    assert model.decode_head.loss_resize_align_corners is True
    fcn = [h for h in model.aux_heads if isinstance(h, FCNHead)]
    assert [h.loss_resize_align_corners for h in fcn] == [False, False]
    detail = [h for h in model.aux_heads if isinstance(h, DetailHead)]
    assert detail[0].align_corners is True and detail[0].dice_denominator == "squared"

    over = ["model.pretrained=null", "model.aux_heads.0.loss_align_corners=true",
            "model.aux_heads.1.loss_align_corners=null"]
    with torch.device("meta"):
        model = build_segmentor(load_recipe(ROOT / "recipes/stdc/cityscapes_stdc1_baseline.yaml", over),
                                META, load_pretrained=False)
    assert [h.loss_resize_align_corners for h in model.aux_heads[:2]] == [True, True]  # null = the model's


def test_aux_loss_align_corners_option_changes_the_loss():
    torch.manual_seed(0)
    ce = CrossEntropyLoss(ignore_index=255)
    logits = torch.randn(2, 3, 8, 8)
    label = torch.randint(0, 3, (2, 64, 64))
    values = {}
    for flag in (False, True):
        head = FCNHead(16, 3, channels=8, num_convs=1, concat_input=False, align_corners=True,
                       loss=ce, loss_align_corners=flag)
        want = ce(F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=flag), label)
        values[flag] = head.loss(logits, label)
        torch.testing.assert_close(values[flag], want)
    assert not torch.isclose(values[False], values[True])
    # unset: the model's align_corners, as before
    head = FCNHead(16, 3, channels=8, num_convs=1, concat_input=False, align_corners=True, loss=ce)
    torch.testing.assert_close(head.loss(logits, label), values[True])


# ----------------------------------------------------------------------------------------------
# §3 STDC detail-head Dice


def test_dice_denominators_by_hand():
    # p = (1, .5, .5, 0), t = (1, 1, 0, 0): sum pt = 1.5, sum p = 2, sum p^2 = 1.5, sum t = sum t^2 = 2
    p = torch.tensor([[1.0, 0.5, 0.5, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    linear = dice_loss(p, t, denominator="linear")  # 1 - (2*1.5 + 1) / (2 + 2 + 1) = 1/5
    squared = dice_loss(p, t, denominator="squared")  # 1 - (2*1.5 + 1) / (1.5 + 2 + 1) = 1/9
    torch.testing.assert_close(linear, torch.tensor(1 / 5))
    torch.testing.assert_close(squared, torch.tensor(1 / 9))
    torch.testing.assert_close(dice_loss(p, t), squared)  # the default is the paper's
    # per image, then averaged: a second image p = (.5, .5, .5, .5), t = (0, 0, 0, 1):
    # sum pt = .5, sum p = 2, sum p^2 = 1, sum t = 1 -> linear 1 - 2/4 = 1/2, squared 1 - 2/3 = 1/3
    p2 = torch.cat([p, torch.full((1, 4), 0.5)])
    t2 = torch.cat([t, torch.tensor([[0.0, 0.0, 0.0, 1.0]])])
    torch.testing.assert_close(dice_loss(p2, t2, denominator="linear"), torch.tensor((1 / 5 + 1 / 2) / 2))
    torch.testing.assert_close(dice_loss(p2, t2, denominator="squared"), torch.tensor((1 / 9 + 1 / 3) / 2))
    with pytest.raises(ValueError, match="squared"):
        dice_loss(p, t, denominator="cubic")


def test_detail_head_dice_option():
    torch.manual_seed(0)
    feats = [torch.randn(2, 16, 8, 8)]
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[:, 8:24, 8:24] = 1
    t = detail_target(label).flatten(1)
    losses = {}
    for form in ("squared", "linear"):
        torch.manual_seed(1)
        head = DetailHead(16, 3, channels=8, dice_denominator=form)
        logits = head(feats)
        up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=True)
        p = torch.sigmoid(up).flatten(1)
        denom = (p * p).sum(1) + (t * t).sum(1) if form == "squared" else p.sum(1) + t.sum(1)
        dice = (1 - (2 * (p * t).sum(1) + 1) / (denom + 1)).mean()
        losses[form] = head.loss(logits, label)
        torch.testing.assert_close(losses[form], F.binary_cross_entropy_with_logits(up, t.view_as(up)) + dice)
    assert losses["squared"] < losses["linear"]  # sum p^2 <= sum p for p in [0, 1]
    assert DetailHead(16, 3).dice_denominator == "squared"
    with pytest.raises(ValueError, match="dice_denominator"):
        DetailHead(16, 3, dice_denominator="cubic")


# ----------------------------------------------------------------------------------------------
# §4 frozen-backbone BatchNorm (documented, unchanged)


def test_bn_eval_defaults_are_documented_behaviour():
    import inspect

    for name in ("head", "bias", "side", "adapter", "spm"):
        assert inspect.signature(METHODS[name]).parameters["bn_eval"].default is True, name
    assert inspect.signature(METHODS["partial"]).parameters["bn_eval"].default is False
    for path in (ROOT / "recipes/stdc/cityscapes_stdc1_stage2.yaml", ROOT / "recipes/stdc/camvid_stdc1_stage2.yaml"):
        assert load_recipe(path).tuning["bn_eval"] is False


def test_setr_vitl_recipes_evaluate_with_setrs_sliding_window():
    """SETR evaluates ViT-L on ADE20K with 512x512 windows at stride 341; a dataset base listed after
    the model base used to reset that to whole-image evaluation."""
    from segprompt.config import load_recipe, shipped_recipes

    recipes = sorted((shipped_recipes() / "spm").glob("ade20k_vitl_*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        ev = load_recipe(path).evaluation
        assert (ev.mode, list(ev.crop_size), list(ev.stride)) == ("slide", [512, 512], [341, 341]), path.name
