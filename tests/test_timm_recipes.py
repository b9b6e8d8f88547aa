"""The shipped timm-backbone recipes (docs/timm.md): ConvNeXt-T and DINOv2 ViT-S/14 on ADE20K with
head, LoRA and SPM. Each builds and counts sensibly on the meta device (no weights, no data), its
geometry is what its comments promise, one of each family trains two iterations from a local
weights file the test writes (through the real loading code), and a missing weights file is a
one-line error that names the file and says where it goes."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import timm
import torch
from conftest import run_cli
from torch import nn

from segprompt.cli import main
from segprompt.config import load_recipe, shipped_name, shipped_recipes
from segprompt.models import BACKBONES
from segprompt.tuning.spm_layers import spm_param_count

CONVNEXT = ["spm/ade20k_convnext-t_head", "spm/ade20k_convnext-t_lora", "spm/ade20k_convnext-t_spm"]
DINOV2 = ["spm/ade20k_dinov2-vits14_head", "spm/ade20k_dinov2-vits14_lora", "spm/ade20k_dinov2-vits14_spm"]
TIMM_RECIPES = CONVNEXT + DINOV2


def _backbone(cfg) -> nn.Module:
    spec = dict(cfg.model.backbone)
    with torch.device("meta"):
        return BACKBONES[spec.pop("name")](**spec)


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``segprompt ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_every_shipped_timm_recipe_is_checked_here():
    """A new shipped recipe with a timm backbone must join TIMM_RECIPES, so the tests below cover it."""
    paths = sorted((shipped_recipes() / "spm").glob("*.yaml"))
    found = {shipped_name(p).removesuffix(".yaml") for p in paths
             if re.search(r"convnext|dinov2|timm", p.name) or load_recipe(p).model.backbone["name"] == "timm"}
    assert found == set(TIMM_RECIPES)


def _lora_count(backbone: nn.Module, target: str, rank: int) -> int:
    """docs/tuning.md, "Parameter count": r·(in + out) per Linear, r·(in·kh·kw + out) per ungrouped
    Conv2d, over the backbone layers whose names ``target`` matches (re.search)."""
    total = 0
    for name, m in backbone.named_modules():
        if not re.search(target, name):
            continue
        if isinstance(m, nn.Linear):
            total += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d) and m.groups == 1:
            total += rank * (m.in_channels * math.prod(m.kernel_size) + m.out_channels)
    return total


@pytest.mark.parametrize("name", TIMM_RECIPES)
def test_count_params_on_shipped_timm_recipe(name, capsys):
    code, out, err = _cli(capsys, "count-params", name, "--json")
    assert code == 0, err
    res = json.loads(out)
    g = res["groups"]
    cfg = load_recipe(name)
    assert res["num_classes"] == 150  # ADE20K, from the dataset base: no data needed

    # the frozen backbone: timm's network less its classifier, nothing of it trains
    spec = cfg.model.backbone
    with torch.device("meta"):
        unpruned = timm.create_model(spec["model"], pretrained=False)
    classifier = sum(p.numel() for n, p in unpruned.named_parameters() if n.startswith("head."))
    every = sum(p.numel() for p in unpruned.parameters())
    assert 0.95 * every < g["backbone"]["total"] <= every - classifier
    assert g["backbone"]["trainable"] == 0
    # the heads train whole, the same heads whatever the method
    assert g["head"]["trainable"] == g["head"]["total"] > 0
    head_only = name.rsplit("_", 1)[0] + "_head"
    assert load_recipe(head_only).model.decode_head == cfg.model.decode_head

    method = cfg.tuning["name"]
    if method == "head":
        assert g["prompt"] == {"total": 0, "trainable": 0}
    elif method == "lora":
        target = cfg.tuning.get("target", ".*")
        want = _lora_count(_backbone(cfg), target, cfg.tuning["rank"])
        assert g["prompt"] == {"total": want, "trainable": want} and want > 0
    else:
        assert method == "spm"
        # one SPM per prompted slot, each at that slot's width (SPM weights are shared over R)
        slots = _backbone(cfg).slot_channels
        want = sum(spm_param_count(slots[s - 1], 150, channels=cfg.tuning["channels"]) for s in cfg.tuning["stages"])
        assert g["prompt"] == {"total": want, "trainable": want} and want > 0
    assert 0 < res["trainable"] < res["full_tuning"]


def test_recipe_geometry_is_what_the_comments_say():
    # ConvNeXt-T at output stride 16: the last two features at 1/16 (stages.3 dilated, not strided)
    cfg = load_recipe(CONVNEXT[0])
    convnext = _backbone(cfg).eval()
    with torch.device("meta"):
        feats = convnext(torch.empty(1, 3, 512, 512))
    assert [f.shape[-1] for f in feats] == [128, 64, 32, 32]
    assert convnext.slot_channels == [96, 192, 384, 768]

    # DINOv2 ViT-S/14: 3 stages of 4 blocks, crops and windows of whole patches at the grid the
    # position embedding was trained at (37x37 + the cls token), so it is used without resizing
    for name in DINOV2:
        cfg = load_recipe(name)
        vit = _backbone(cfg)
        assert vit.stage_starts == (0, 4, 8) and vit.out_indices == (3, 7, 11) and vit.patch_size == 14
        crop, window = cfg.data.train.crop_size, cfg.evaluation.crop_size
        assert cfg.evaluation.mode == "slide" and tuple(crop) == tuple(window) == (518, 518)
        grid = crop[0] // vit.patch_size
        assert crop[0] % vit.patch_size == 0
        assert vit.body.pos_embed.shape[1] == grid * grid + vit.num_prefix_tokens
        assert cfg.evaluation.stride[0] <= crop[0]
    # the weights' normalisation (ImageNet mean/std in 0..255 units)
    for name in TIMM_RECIPES:
        data = load_recipe(name).data
        assert list(data.mean) == [123.675, 116.28, 103.53] and list(data.std) == [58.395, 57.12, 57.375]


# ---- training from a local weights file ----------------------------------------------------------

TINY = ["data.num_classes=4", "data.batch_size=2", "data.train.scale=[64,64]", "data.train.crop_size=[56,56]",
        "data.test.scale=[64,64]", "schedule.iters=2", "evaluation.interval=0", "checkpoint.interval=2",
        "runtime.device=cpu", "runtime.num_workers=0", "runtime.log_interval=1"]
# 56 = 4 patches of 14; the slide window must fit the tiny images
TINY_VIT = ["evaluation.crop_size=[56,56]", "evaluation.stride=[42,42]"]


def _write_weights(model: str, path, wrap: bool) -> dict[str, torch.Tensor]:
    """A random state dict of timm's unpruned model (classifier included), as a user saves it."""
    torch.manual_seed(0)
    state = timm.create_model(model, pretrained=False).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state} if wrap else state, path)
    return state


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """4 training and 2 validation images of 64x64, 4 classes: two iterations at batch 2 and one
    evaluation, as little data as a run needs."""
    from segprompt.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("tiny") / "synthetic"
    generate_synthetic(root, seed=0, num_classes=4, image_size=(64, 64), counts={"train": 4, "val": 2, "test": 1})
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name, file", [("spm/ade20k_convnext-t_spm", "convnext_tiny.safetensors"),
                                        ("spm/ade20k_dinov2-vits14_spm", "dinov2_vits14.pth")])
def test_shipped_timm_recipe_trains_from_a_local_weights_file(name, file, tmp_path, tiny_root):
    from segprompt.build import build_segmentor, dataset_meta

    cfg = load_recipe(name)
    weights = tmp_path / file
    state = _write_weights(cfg.model.backbone["model"], weights, wrap=True)
    over = [f"data.root={tiny_root}", f"model.pretrained={weights}", *TINY,
            *(TINY_VIT if "dinov2" in name else [])]
    run = tmp_path / "run"
    res = run_cli("train", name, "--out", str(run), *[a for o in over for a in ("--set", o)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done: 2 iterations" in (run / "train.log").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any(k.startswith("loss_spm") for r in rows for k in r)  # the SPMs trained with their interim losses
    # the run records the weights file (path and digest) as the source of its frozen backbone ...
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    src = ckpt["frozen_source"]
    assert src["path"] == str(weights) and src["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # ... and the recipe's model, built as train builds it, holds the file's tensors: the classifier
    # dropped, everything else exactly
    cfg = load_recipe(name, over)
    body = build_segmentor(cfg, dataset_meta(cfg)).backbone.body.state_dict()
    assert body and not any(k.startswith("head.") for k in body)
    assert all(torch.equal(v, state[k]) for k, v in body.items())


@pytest.mark.parametrize("name, file", [(CONVNEXT[0], "pretrained/convnext_tiny.fb_in22k_ft_in1k.safetensors"),
                                        (DINOV2[0], "pretrained/vit_small_patch14_dinov2.lvd142m.safetensors")])
def test_missing_weights_file_is_one_line_naming_it(name, file, tmp_path, tiny_root, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative path, certainly absent here
    code, _, err = _cli(capsys, "train", name, "--out", tmp_path / "run", "--set", f"data.root={tiny_root}",
                        "--set", "data.num_classes=4", "--set", "runtime.device=cpu", "--set", "runtime.num_workers=0")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith("error: ") and f"'{file}'" in line and "model.pretrained" in line
    assert "Put the timm checkpoint file there" in line and "nothing is downloaded" in line
