"""LoRA tuning (segprompt/tuning/lora.py): peft's layers on our backbones, counts, training, checkpoints."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from torch import nn

from segprompt.config import load_recipe
from segprompt.errors import SegpromptError
from segprompt.models import EncoderDecoder
from segprompt.models.backbones.resnet import ResNet
from segprompt.models.backbones.vit import VisionTransformer
from segprompt.models.frozen import kept_in_eval
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.losses import CrossEntropyLoss
from segprompt.runs.checkpoint import changed_state_dict, load_model_state
from segprompt.tuning import METHODS, TuningContext
from segprompt.tuning.lora import LoRA

K = 3
LORA_PARAM = re.compile(r"\.lora_[AB]\.default\.weight$")


def resnet_model(seed: int = 0) -> EncoderDecoder:
    """Width 8, a stride-2 stage and a dilated last stage (the case peft alone gets wrong)."""
    torch.manual_seed(seed)
    backbone = ResNet(depth=18, base_channels=8, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    loss = CrossEntropyLoss()
    ch = backbone.out_channels
    return EncoderDecoder(backbone, FCNHead(ch[3], K, channels=16, num_convs=1, loss=loss),
                          [FCNHead(ch[2], K, channels=8, num_convs=1, concat_input=False, in_index=2,
                                   loss_weight=0.4, loss=loss)])


def vit_model(seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, out_indices=(0, 1),
                                 num_stages=2)
    return EncoderDecoder(backbone, FCNHead(24, K, channels=8, num_convs=1, loss=CrossEntropyLoss()))


BUILDERS = {"resnet": resnet_model, "vit": vit_model}


def tuned(kind: str = "resnet", seed: int = 0, **kwargs) -> EncoderDecoder:
    model = BUILDERS[kind](seed)
    torch.manual_seed(seed + 1)
    LoRA(**kwargs).apply(model, TuningContext(num_classes=K))
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, K, (2, 32, 32), generator=g)


def lora_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if LORA_PARAM.search(n))


def closed_form(backbone: nn.Module, rank: int) -> int:
    """rank·(in + out) per Linear; rank·(in·kh·kw + out) per Conv2d (A: kxk conv in -> r, B: 1x1 r -> out)."""
    total = 0
    for m in backbone.modules():
        if isinstance(m, nn.Linear):
            total += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            total += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return total


def sgd_step(model: nn.Module, params=None) -> None:
    model.train()
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    img, label = batch()
    sum(model(img, label).values()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_registered_and_configurable():
    assert METHODS["lora"] is LoRA
    cfg = load_recipe(REPO / "recipes/smoke.yaml",
                      ["tuning.name=lora", "tuning.rank=4", "tuning.alpha=8", "tuning.dropout=0.1",
                       "tuning.target=layer4", "tuning.bn_eval=false"])
    assert dict(cfg.tuning) == {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1, "target": "layer4",
                                "bn_eval": False}
    with pytest.raises(SegpromptError, match="tuning.rnk"):
        load_recipe(REPO / "recipes/smoke.yaml", ["tuning.name=lora", "tuning.rnk=4"])


@pytest.mark.parametrize("kind", ["resnet", "vit"])
@pytest.mark.parametrize("rank", [2, 8])
def test_trainable_count_equals_peft_and_closed_form(kind, rank):
    from peft import LoraConfig, get_peft_model

    plain = BUILDERS[kind]().backbone
    model = tuned(kind, rank=rank)
    # peft's own report for the same layers on an untouched copy of the backbone
    names = [n for n, m in plain.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    peft_model = get_peft_model(copy.deepcopy(plain), LoraConfig(r=rank, lora_alpha=16, target_modules=names))
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_count(model) == peft_trainable == closed_form(plain, rank)
    if kind == "vit":  # the patch embedding (conv 3 -> 24, 8x8) and qkv/proj/fc1/fc2 of both layers
        assert closed_form(plain, rank) == rank * ((3 * 64 + 24) + 2 * ((24 + 72) + (24 + 24) + (24 + 96) + (96 + 24)))


def test_only_lora_matrices_and_heads_train():
    model = tuned("resnet")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if n.startswith("backbone.")}
    assert lora and all(LORA_PARAM.search(n) for n in lora)
    heads = {n for n, _ in model.named_parameters() if n.startswith(("decode_head.", "aux_heads."))}
    assert trainable == lora | heads
    # every conv of the backbone got its pair; the pretrained weight moved under base_layer, same tensor
    convs = [n for n, m in resnet_model().backbone.named_modules() if isinstance(m, nn.Conv2d)]
    assert {f"backbone.{c}.lora_{ab}.default.weight" for c in convs for ab in "AB"} == lora
    assert all(f"backbone.{c}.base_layer.weight" in dict(model.named_parameters()) for c in convs)
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(kept_in_eval(m) for m in bns)  # frozen statistics (bn_eval)
    model.train()
    assert not any(m.training for m in bns)
    # the target regex picks layers by name
    only = tuned("resnet", target=r"^layer4\.\d+\.conv2$")
    assert {n.split(".lora_")[0] for n, p in only.named_parameters() if LORA_PARAM.search(n)} == {
        "backbone.layer4.0.conv2", "backbone.layer4.1.conv2"}


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_starts_as_the_frozen_model_and_one_step_changes_it(kind):
    img, _ = batch(1)
    frozen = BUILDERS[kind]().eval()
    model = tuned(kind).eval()
    with torch.no_grad():
        ref = frozen(img)
        torch.testing.assert_close(model(img), ref, rtol=0, atol=0)  # B = 0: the update is exactly 0
    base = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    sgd_step(model, [p for n, p in model.named_parameters() if LORA_PARAM.search(n)])  # LoRA only
    model.eval()
    with torch.no_grad():
        assert (model(img) - ref).abs().max() > 1e-4
    assert all(torch.equal(p, base[n]) for n, p in model.backbone.named_parameters() if n in base)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_dilated_convs_keep_their_geometry():
    model = tuned("resnet")
    conv = model.backbone.layer4[1].conv1  # 3x3, dilation 2, padding 2
    assert conv.get_base_layer().dilation == (2, 2)
    assert conv.lora_A["default"].dilation == (2, 2) and conv.lora_A["default"].padding == (2, 2)
    x = torch.randn(1, conv.get_base_layer().in_channels, 9, 9)
    assert conv.lora_A["default"](x).shape[-2:] == conv.get_base_layer()(x).shape[-2:]


def test_stage_hook_still_runs():
    """SPM-style hooks sit on the backbone, which peft leaves as it is (only its layers are wrapped)."""

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.slots = []

        def forward(self, i, x):
            self.slots.append(i)
            return x

    for kind, slots in (("resnet", [0, 1, 2, 3, 4]), ("vit", [0, 1, 2])):
        model = tuned(kind).eval()
        model.backbone.stage_hook = Recorder()
        with torch.no_grad():
            model(batch()[0])
        assert model.backbone.stage_hook.slots == slots


def test_checkpoint_round_trip():
    model = tuned("resnet")
    sgd_step(model)
    state = changed_state_dict(model)
    assert not any(".base_layer." in k for k in state)  # frozen weights are not stored
    assert {k for k in state if k.startswith("backbone.")} == {
        n for n, _ in model.named_parameters() if LORA_PARAM.search(n)}
    again = tuned("resnet")  # rebuilt from scratch and tuned again, as eval and resume do
    load_model_state(again, state, "test")
    img, _ = batch(2)
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(img), model(img), rtol=0, atol=0)


def test_meta_device_and_prompt_group():
    from segprompt.measure.params import breakdown

    cfg = load_recipe(REPO / "recipes/smoke.yaml", ["tuning.name=lora", "tuning.rank=4"])
    b = breakdown(cfg, K, "paper")  # built on the meta device
    smoke_backbone = ResNet(**{k: v for k, v in cfg.model.backbone.items() if k != "name"})
    assert b.groups["prompt"] == {"total": closed_form(smoke_backbone, 4), "trainable": closed_form(smoke_backbone, 4)}
    assert b.groups["backbone"]["trainable"] == 0 and b.groups["backbone"]["total"] > 0
    head = breakdown(load_recipe(REPO / "recipes/smoke.yaml", ["tuning.name=head"]), K, "paper")
    assert b.groups["head"] == head.groups["head"] and b.groups["backbone"] == head.groups["backbone"]


def test_bad_options_are_clear_errors():
    # the method describes the option; the builder adds the recipe key (test_the_builder_names_the_recipe_key)
    with pytest.raises(ValueError, match=r"^target 'nothing_here' matches no Conv2d or Linear .*stem\.0"):
        tuned("resnet", target="nothing_here")
    with pytest.raises(ValueError, match=r"^target .*qkv"):
        tuned("vit", target="conv")
    with pytest.raises(ValueError, match="^target '\\(' is not a regular expression"):
        LoRA(target="(")
    with pytest.raises(ValueError, match="^rank must be at least 1"):
        LoRA(rank=0)


def test_the_builder_names_the_recipe_key():
    from segprompt.measure.params import breakdown

    cfg = load_recipe(REPO / "recipes/smoke.yaml", ["tuning.name=lora", "tuning.target=nothing_here"])
    with pytest.raises(SegpromptError, match=r"^tuning \('lora'\): target 'nothing_here' matches no Conv2d .*; "
                                             r"change it in the recipe or with --set$"):
        breakdown(cfg, K, "paper")


@pytest.mark.slow
def test_train_then_eval_reproduces_the_stored_miou(tmp_path, synthetic_root):
    from segprompt.training.launch import train

    run = train(REPO / "recipes/smoke.yaml",
                ["tuning.name=lora", "tuning.rank=4", f"data.root={synthetic_root}", "data.batch_size=4",
                 "data.train.scale=[64,64]", "data.train.crop_size=[48,48]", "data.test.scale=[64,64]",
                 "schedule.iters=4", "schedule.warmup_iters=1", "evaluation.interval=4", "checkpoint.interval=4",
                 "runtime.device=cpu", "runtime.num_workers=0", "runtime.log_interval=1"],
                out=tmp_path / "run")
    stored = json.loads((run / "eval.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    keys = [k for k in ckpt["model"] if k.startswith("backbone.")]
    assert keys and all(LORA_PARAM.search(k) for k in keys)  # LoRA matrices only, no frozen weights
    res = run_cli("eval", str(run), "--checkpoint", "last", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    again = json.loads((Path(run) / "eval.json").read_text())
    assert again["mIoU"] == pytest.approx(stored["mIoU"])
    assert (Path(run) / "eval_history").is_dir()
