"""Tuning methods: what trains, what stays bitwise frozen, exact SPM-paper counts, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from segprompt.config import OptimizerConfig
from segprompt.models import EncoderDecoder
from segprompt.models.backbones.resnet import ResNet
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.losses import CrossEntropyLoss
from segprompt.runs.checkpoint import changed_state_dict, load_model_state
from segprompt.training.optim import build_optimizer
from segprompt.tuning import METHODS, TuningContext

K = 3

# which parameters each method trains, by name
TRAINS = {
    "full": lambda n: True,
    "scratch": lambda n: True,
    "head": lambda n: not n.startswith("backbone."),
    "bias": lambda n: not n.startswith("backbone.") or n.endswith(".bias"),
    "side": lambda n: not n.startswith("backbone.") or ".side." in n,
    "adapter": lambda n: not n.startswith("backbone.") or ".adapter." in n,
}
FROZEN_BN = {"head", "bias", "side", "adapter"}  # backbone BatchNorm statistics stay fixed


def tiny_model(depth: int = 18, seed: int = 0) -> EncoderDecoder:
    """Width 8, a stride-2 stage and a dilated stage, main and auxiliary FCN heads."""
    torch.manual_seed(seed)
    backbone = ResNet(depth=depth, base_channels=8, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    loss = CrossEntropyLoss()
    ch = backbone.out_channels
    return EncoderDecoder(backbone, FCNHead(ch[3], K, channels=16, num_convs=1, loss=loss),
                          [FCNHead(ch[2], K, channels=8, num_convs=1, concat_input=False, in_index=2,
                                   loss_weight=0.4, loss=loss)])


def tuned(name: str, depth: int = 18, seed: int = 0) -> EncoderDecoder:
    model = tiny_model(depth, seed)
    torch.manual_seed(seed + 1)
    METHODS[name]().apply(model, TuningContext(num_classes=K))
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, K, (2, 32, 32), generator=g)


def sgd_steps(model: nn.Module, steps: int = 2) -> None:
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4))
    model.train()
    for i in range(steps):
        img, label = batch(i)
        opt.zero_grad(set_to_none=True)
        sum(model(img, label).values()).backward()
        opt.step()


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("name", sorted(TRAINS))
def test_exactly_the_declared_parameters_train(name, depth):
    model = tuned(name, depth)
    names = [n for n, _ in model.named_parameters()]
    declared = {n for n in names if TRAINS[name](n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == declared
    if name in ("side", "adapter"):
        assert sum(f".{name}." in n for n in names) == 4 * len([b for s in model.backbone.stages for b in s])

    model.train()
    backbone_bn = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training == (name not in FROZEN_BN) for m in backbone_bn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sgd_steps(model)

    assert {n for n, p in model.named_parameters() if p.grad is not None} == declared
    after = model.state_dict()
    for n, _ in model.named_parameters():
        assert torch.equal(after[n], before[n]) != (n in declared), n  # frozen: bitwise equal; trained: moved
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            same = torch.equal(after[f"{mod_name}.running_mean"], before[f"{mod_name}.running_mean"])
            assert same == (not m.training), mod_name  # frozen statistics bitwise unchanged, others updated


SPM_COUNTS = {"bias": 52_736, "side": 6_511_424, "adapter": 6_797_120}


@pytest.mark.parametrize("name", sorted(SPM_COUNTS))
def test_backbone_counts_match_the_spm_paper(name):
    with torch.device("meta"):
        backbone = ResNet(depth=101, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
        model = EncoderDecoder(backbone, FCNHead(2048, 150, channels=512, loss=CrossEntropyLoss()),
                               [FCNHead(1024, 150, num_convs=1, concat_input=False, in_index=2,
                                        loss=CrossEntropyLoss())])
        METHODS[name]().apply(model, TuningContext(num_classes=150))
    assert sum(p.numel() for p in model.backbone.parameters() if p.requires_grad) == SPM_COUNTS[name]
    assert all(p.requires_grad for head in (model.decode_head, *model.aux_heads) for p in head.parameters())


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("name", ["side", "adapter"])
def test_side_and_adapter_start_as_the_pretrained_model(name, depth):
    ref = tiny_model(depth).eval()
    model = tuned(name, depth).eval()
    img, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(img), ref(img))


def test_scratch_reinitialises_the_backbone_reproducibly():
    pretrained = tiny_model(seed=1)
    for m in pretrained.backbone.modules():  # make the "pretrained" statistics and affine values visible
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(2, 3)
                m.bias.uniform_(1, 2)
            m.running_mean.fill_(5)
            m.running_var.fill_(7)
    a, b = copy.deepcopy(pretrained), tiny_model(seed=2)
    for model in (a, b):
        torch.manual_seed(10)
        METHODS["scratch"]().apply(model, TuningContext(num_classes=K))
    sa, sb = a.backbone.state_dict(), b.backbone.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # nothing of the loaded weights survives
    for m in a.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
            assert (m.running_mean == 0).all() and (m.running_var == 1).all() and m.num_batches_tracked == 0
    w = a.backbone.layer4[1].conv2.weight  # Kaiming normal, fan-out mode: std = sqrt(2 / (C_out * 3 * 3))
    assert abs(w.std().item() / (2 / (w.shape[0] * 9)) ** 0.5 - 1) < 0.05
    assert not torch.equal(a.backbone.layer4[1].conv2.weight, pretrained.backbone.layer4[1].conv2.weight)


@pytest.mark.parametrize("name", ["head", "bias", "side", "adapter"])
def test_checkpoint_holds_trained_tensors_and_live_buffers_only(name):
    model = tuned(name, depth=50)
    sgd_steps(model, 1)
    state = changed_state_dict(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head_buffers = {n for n, _ in model.named_buffers() if not n.startswith("backbone.")}
    assert set(state) == trainable | head_buffers  # frozen BatchNorm statistics are left out

    fresh = tuned(name, depth=50)
    load_model_state(fresh, state, "test")
    img, _ = batch(5)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(img), model.eval()(img))


def test_side_path_geometry_follows_the_block():
    model = tuned("side", depth=50)
    first = model.backbone.layer3[0]  # stride 2, input 64 channels, output 128
    assert first.side.down.stride == (2, 2) and first.side.down.groups == 4
    assert (first.side.down.in_channels, first.side.up.out_channels) == (64, 128)
    dilated = model.backbone.layer4[1]
    assert dilated.side.down.dilation == dilated.conv2.dilation == (2, 2)
    assert "backbone.layer1.0.conv1.weight" in model.state_dict()  # pretrained names unchanged
