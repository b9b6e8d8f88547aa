"""ResNetV1c (deep stem) with dilated stages, as MMSegmentation's `ResNetV1c` (``docs/spm.md``, "Backbones and
heads as the paper counts them").

The network is ``stem -> layer1 .. layer4``; :attr:`ResNet.stages` lists them in order. A tuning
method may set :attr:`stage_hook`, a module called as ``hook(i, x)`` on the input of stage ``i``
(``i = 0..3``) and once more as ``hook(4, x)`` on the last stage's output (the slot before the
head); it returns the tensor the network continues with. ``depth=101`` with ``strides=(1, 2, 1, 1)``,
``dilations=(1, 1, 2, 4)`` is the "d8" backbone of the SPM paper; ``depth=18`` with a small
``base_channels`` is the tiny model of the smoke recipes and the synthetic demo.

``deep_stem=False`` swaps the stem for torchvision's 7x7/2 conv + BN + ReLU + 3x3/2 max-pool.
:func:`load_resnet_checkpoint` loads MMSegmentation's ``resnet101_v1c`` ImageNet files (deep stem)
and torchvision's files (``deep_stem=False``): the module names follow both (``stem.N``;
``conv1``/``bn1``; ``layerX.Y.convZ/bnZ/downsample.N``), so only the unused ``fc`` classifier is
dropped and everything else must match exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from segprompt.models.backbones.base import StagedBackbone
from segprompt.models.weights import load_strict, read_state_dict

_ARCH = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
         101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """PyTorch-style bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(StagedBackbone):
    """ResNetV1c: three-conv deep stem (3->s/2->s/2->s, s = stem_channels) and a 3x3/2 max-pool;
    with ``deep_stem=False`` a torchvision stem (``conv1`` 7x7/2 3->s, ``bn1``, ReLU, max-pool).

    ``contract_dilation`` gives the first block of a dilated stage half the stage's dilation, as
    MMSegmentation does. ``out_indices`` selects which stage outputs :meth:`forward` returns.
    """

    def __init__(self, depth: int = 50, in_channels: int = 3, stem_channels: int | None = None,
                 base_channels: int = 64, strides: tuple[int, int, int, int] = (1, 2, 2, 2),
                 dilations: tuple[int, int, int, int] = (1, 1, 1, 1),
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), contract_dilation: bool = True,
                 deep_stem: bool = True):
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(_ARCH)}")
        kind, blocks = _ARCH[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        s = stem_channels or base_channels
        self.deep_stem = deep_stem
        if deep_stem:
            self.stem = nn.Sequential(*_conv_bn_relu(in_channels, s // 2, 2), *_conv_bn_relu(s // 2, s // 2),
                                      *_conv_bn_relu(s // 2, s), nn.MaxPool2d(3, 2, 1))
        else:
            self.conv1 = nn.Conv2d(in_channels, s, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(s)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.out_indices = tuple(out_indices)
        self.stage_hook: nn.Module | None = None
        cin = s
        self.stage_in_channels: list[int] = []
        self.out_channels: list[int] = []
        for i, (n, stride, dil) in enumerate(zip(blocks, strides, dilations)):
            planes = base_channels * 2**i
            cout = planes * block.expansion
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            first_dil = dil // 2 if (contract_dilation and dil > 1) else dil
            layers = [block(cin, planes, stride, first_dil, down)]
            layers += [block(cout, planes, 1, dil, None) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.stage_in_channels.append(cin)
            self.out_channels.append(cout)
            cin = cout

    @property
    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @property
    def slot_channels(self) -> list[int]:
        """Channels at each hook slot: every stage's input, then the last stage's output."""
        return [*self.stage_in_channels, self.out_channels[-1]]

    @property
    def feature_channels(self) -> list[int]:
        """Channels of each tensor :meth:`forward` returns (what a head's ``in_index`` picks)."""
        return [self.out_channels[i] for i in self.out_indices]

    def load_pretrained(self, path: str | Path, name: str = "resnet") -> None:
        """Load an ImageNet checkpoint strictly (:func:`load_resnet_checkpoint`); errors call the
        backbone ``name``."""
        load_resnet_checkpoint(self, path, name)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x) if self.deep_stem else self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        hook = self.stage_hook
        for i, stage in enumerate(self.stages):
            if hook is not None:
                x = hook(i, x)
            x = stage(x)
            if i == len(self.stages) - 1 and hook is not None:
                x = hook(i + 1, x)
            if i in self.out_indices:
                outs.append(x)
        return outs


def load_resnet_checkpoint(model: ResNet, path: str | Path, name: str = "resnet") -> None:
    """Load an MMSegmentation (``resnet101_v1c``, deep stem) or torchvision (``deep_stem=False``)
    ImageNet checkpoint strictly; the ImageNet classifier ``fc.*`` is dropped."""
    kind = ("an MMSegmentation resnet_v1c ImageNet file, deep stem" if model.deep_stem
            else "a torchvision ImageNet file, 7x7 stem")
    state = {k: v for k, v in read_state_dict(path, name, kind).items() if not k.startswith("fc.")}
    hint = ""
    if model.deep_stem and "conv1.weight" in state:
        hint = ". The file has a torchvision 7x7 stem (conv1/bn1): set model.backbone.deep_stem: false"
    elif not model.deep_stem and "stem.0.weight" in state:
        hint = ". The file has a deep stem (stem.N): set model.backbone.deep_stem: true"
    load_strict(model, state, path, name, hint)
