"""STDC network and the STDC-Seg context path (Fan et al., CVPR 2021, §3.1-3.2, Fig. 4), with the
optional text guidance of the CLIP-distilled STDC-Seg paper (§3.2, "EnText"), as
``docs/stdc_clip.md`` describes them.

* :class:`STDCNet` is the feature path of STDC1/STDC2: two ConvX stem stages (H/2, H/4) and three
  stages of "cat" STDC blocks (H/8, H/16, H/32; 256/512/1024 channels). The ImageNet classifier
  of the original class (``conv_last``, ``fc``, ``bn``, ``linear``) is never built.
* :class:`STDCContextPath` (recipe backbone ``stdc``) wraps it with the global context
  (``conv_avg``), the attention refinement modules ``arm32``/``arm16``, the context-path convs
  ``conv_head32``/``conv_head16`` and the feature fusion module ``ffm``. Like MMSegmentation's
  ``STDCContextPathNet`` it returns the features the heads pick by ``in_index``:
  ``[feat8, feat16_up, feat32_up, ffm_out]`` (+ the text score map ``S`` when text guidance is on).

Module names follow MMSegmentation's ``STDCNet`` (``stages.i[.j].layers.k``, ``downsample``) so its
converted ImageNet files load by name; :func:`load_stdc_checkpoint` also renames the keys of the
original ``STDCNet813M_73.91.tar`` / ``STDCNet1446_76.47.tar``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.models.backbones.base import StagedBackbone
from segprompt.models.weights import load_strict, read_state_dict

# blocks per stage (stages 3, 4, 5) and the files each variant's ImageNet weights come in
_ARCH = {"stdc1": (2, 2, 2), "stdc2": (4, 5, 3)}
_FILES = {"stdc1": ("STDCNet813M_73.91.tar", "stdc1_20220308-5368626c.pth"),
          "stdc2": ("STDCNet1446_76.47.tar", "stdc2_20220308-7dbd9127.pth")}
WIDTHS = (32, 64, 256, 512, 1024)  # feat2, feat4, feat8, feat16, feat32


class ConvX(nn.Module):
    """conv (no bias, padding k//2) -> BN -> ReLU; STDC's basic unit, also the context path's
    ConvBNReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ConvBN(nn.Module):
    """The stride-2 block's depthwise 3x3/2 conv + BN, no activation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class STDCBlock(nn.Module):
    """Short-Term Dense Concatenate block, "cat" type (STDC paper Fig. 2b/c): sequential branches
    1x1 -> C/2, 3x3 -> C/4, 3x3 -> C/8, ..., last 3x3 keeps its width; the output is the
    concatenation of every branch (C channels), without a residual. With ``stride=2`` a depthwise
    3x3/2 conv + BN sits between branches 1 and 2, and branch 1's copy in the concatenation is
    average-pooled (3x3/2, pad 1)."""

    def __init__(self, cin: int, cout: int, stride: int, num_convs: int = 4):
        super().__init__()
        if stride not in (1, 2) or num_convs < 2:
            raise ValueError(f"STDC block needs stride 1 or 2 and >= 2 convs, got {stride}, {num_convs}")
        self.layers = nn.ModuleList([ConvX(cin, cout // 2, 1)])
        for i in range(1, num_convs):
            out_div = 2 ** (i + 1) if i < num_convs - 1 else 2**i
            self.layers.append(ConvX(cout // 2**i, cout // out_div, 3))
        self.downsample = ConvBN(cout // 2) if stride == 2 else None
        self.skip = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.layers[0](x)
        out = first if self.downsample is None else self.downsample(first)
        outs = [first if self.skip is None else self.skip(first)]
        for layer in self.layers[1:]:
            out = layer(out)
            outs.append(out)
        return torch.cat(outs, dim=1)


class STDCNet(nn.Module):
    """STDC1 (``variant="stdc1"``, 2/2/2 blocks) or STDC2 (``"stdc2"``, 4/5/3 blocks).

    ``forward`` returns ``[feat2, feat4, feat8, feat16, feat32]`` with :data:`WIDTHS` channels at
    strides 2..32. ``stages`` is ``[ConvX 3->32 /2, ConvX 32->64 /2, stage3, stage4, stage5]``.
    """

    def __init__(self, variant: Literal["stdc1", "stdc2"] = "stdc1", in_channels: int = 3, num_convs: int = 4):
        super().__init__()
        if variant not in _ARCH:
            raise SegpromptError(f"STDC variant must be one of {sorted(_ARCH)}, got {variant!r}")
        self.variant = variant
        self.stages = nn.ModuleList([ConvX(in_channels, WIDTHS[0], 3, 2), ConvX(WIDTHS[0], WIDTHS[1], 3, 2)])
        for i, n in enumerate(_ARCH[variant]):
            cin, cout = WIDTHS[i + 1], WIDTHS[i + 2]
            self.stages.append(nn.Sequential(*[STDCBlock(cin if j == 0 else cout, cout, 2 if j == 0 else 1, num_convs)
                                               for j in range(n)]))
        # the original init_params: Kaiming normal (fan_out) convs; BN weight 1, bias 0 (torch default)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    @property
    def feature_channels(self) -> list[int]:
        return list(WIDTHS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def load_pretrained(self, path: str | Path, name: str = "stdc") -> None:
        load_stdc_checkpoint(self, path, name)


# ----------------------------------------------------------------------------------------------
# ImageNet checkpoints

_CLASSIFIER = ("conv_last.", "fc.", "bn.", "linear.", "final_conv.")  # ImageNet head: never run here
# the original class also registers x2/x4/x8/x16/x32, slices of `features` holding the same
# modules, so its state dict repeats every tensor under those names
_ALIAS = re.compile(r"^x(2|4|8|16|32)\.")


def _original_to_ours(key: str, stage_of: list[str]) -> str:
    """``features.N.conv_list.k.* / avd_layer.{0,1}.*`` -> ``stages.S[.j].layers.k.* / downsample.{conv,bn}.*``."""
    m = re.match(r"features\.(\d+)\.(.*)$", key)
    if not m or int(m.group(1)) >= len(stage_of):
        return key  # reported as unexpected by load_strict
    rest = m.group(2).replace("conv_list.", "layers.")
    rest = re.sub(r"^avd_layer\.0\.", "downsample.conv.", rest)
    rest = re.sub(r"^avd_layer\.1\.", "downsample.bn.", rest)
    return f"stages.{stage_of[int(m.group(1))]}.{rest}"


def convert_stdc_state_dict(state: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """Our key names for a state dict in either layout (original ``features.N`` or MMSegmentation's
    ``stages.i.j``): ``module.`` prefixes stripped, alias copies and the ImageNet classifier dropped."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER) and not _ALIAS.match(k)}
    if not any(k.startswith("features.") for k in state):
        return state  # MMSegmentation's layout is ours
    # features.0/1 are the stem, then one entry per block: stdc1 -> 2.0 2.1 3.0 3.1 4.0 4.1
    stage_of = ["0", "1"] + [f"{s + 2}.{j}" for s, n in enumerate(_ARCH[variant]) for j in range(n)]
    return {_original_to_ours(k, stage_of): v for k, v in state.items()}


def _num_blocks(state: dict[str, torch.Tensor]) -> int:
    """STDC blocks in a state dict of either layout (6 for stdc1, 12 for stdc2)."""
    feats = {m.group(1) for k in state if (m := re.match(r"(?:module\.)?features\.(\d+)\.", k))}
    if feats:
        return len(feats) - 2
    return len({m.group(1) for k in state if (m := re.match(r"(?:module\.)?stages\.(\d+\.\d+)\.", k))})


def load_stdc_checkpoint(model: STDCNet, path: str | Path, name: str = "stdc") -> None:
    """Load STDC ImageNet weights strictly from a local file: the original ``STDCNet813M_73.91.tar``
    (stdc1) / ``STDCNet1446_76.47.tar`` (stdc2) -- plain torch checkpoints despite the extension,
    keys ``features.N.*`` under ``state_dict`` -- or MMSegmentation's converted
    ``stdc1_20220308-5368626c.pth`` / ``stdc2_20220308-7dbd9127.pth`` (keys ``stages.*``). The
    classifier keys are dropped; any other missing or unexpected key is an error that lists them."""
    original, mmseg = _FILES[model.variant]
    kind = (f"the STDC-Seg ImageNet file, e.g. pretrained/{original} from MichaelFan01/STDC-Seg or "
            f"MMSegmentation's converted {mmseg}")
    raw = read_state_dict(path, name, kind)
    state = convert_stdc_state_dict(raw, model.variant)
    hint = ""
    blocks = _num_blocks(raw)
    for variant, arch in _ARCH.items():
        if variant != model.variant and blocks == sum(arch):
            hint = f". The file has the {blocks} STDC blocks of {variant}: set model.backbone.variant: {variant}"
    load_strict(model, state, path, name, hint)


# ----------------------------------------------------------------------------------------------
# STDC-Seg context path


class AttentionRefinement(nn.Module):
    """ARM: 3x3 ConvBNReLU, then a channel attention GAP -> 1x1 conv (no bias) -> BN -> sigmoid
    that multiplies it. The pooling is a module (as in MMSegmentation), so FLOP counters see it."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvX(cin, cout, 3)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cout, cout, 1, bias=False),
                                       nn.BatchNorm2d(cout), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * self.attention(x)


class FeatureFusion(nn.Module):
    """FFM: 1x1 ConvBNReLU on concat(spatial, context), then ``x * att + x`` with
    att = GAP -> 1x1 (C -> C/4) -> ReLU -> 1x1 (C/4 -> C) -> sigmoid (bias-free convs)."""

    def __init__(self, cin: int, cout: int, reduction: int = 4):
        super().__init__()
        self.conv = ConvX(cin, cout, 1)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cout, cout // reduction, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(cout // reduction, cout, 1, bias=False), nn.Sigmoid())

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat([spatial, context], dim=1))
        return x * self.attention(x) + x


class STDCContextPath(StagedBackbone):
    """STDC-Seg's network up to the heads (recipe backbone ``stdc``).

    ``forward(img)`` returns ``[feat8 (256, H/8), feat16_up (128, H/8), feat32_up (128, H/16),
    ffm_out (256, H/8)]`` and, with text guidance, ``S`` (K, H/32) as a fifth element; their
    channels are :attr:`feature_channels`. The STDC-Seg heads pick them by ``in_index``: decode
    FCN 3, auxiliary FCNs 1 and 2, detail head 0, text score head 4. (MMSegmentation orders the
    middle two the other way: its auxiliary heads use ``in_index`` 2 and 1.)

    ``text`` (a mapping of options) switches on the paper's EnText guidance:
    ``segprompt.models.text.guidance.TextGuidance(class_names, **text)`` maps feat32 (the paper's
    F4) to the cosine score map S (K channels), and concat(feat32, S) feeds both ``arm32`` and the
    global context ``conv_avg`` (their inputs grow from 1024 to 1024 + K channels; ``docs/stdc_clip.md``, "Text guidance").
    ``class_names`` are the dataset's classes (meta.json), given by the builder.
    """

    def __init__(self, variant: Literal["stdc1", "stdc2"] = "stdc1", context_channels: int = 128,
                 fusion_channels: int = 256, text: dict[str, Any] | None = None,
                 class_names: list[str] | None = None):
        super().__init__()
        self.stdc = STDCNet(variant)
        c8, c16, c32 = WIDTHS[2:]
        self.text_guidance: nn.Module | None = None
        extra = 0
        if text is not None:
            if not class_names:
                raise SegpromptError("model.backbone.text (text guidance) needs the class names of the dataset "
                                     "(from its meta.json); none were given")
            from segprompt.models.text.guidance import (
                TextGuidance,  # lazily: only text-guided models need it
            )

            self.text_guidance = TextGuidance(list(class_names), **text)
            extra = int(self.text_guidance.num_classes)
        c = context_channels
        self.conv_avg = ConvX(c32 + extra, c, 1)
        self.arm32 = AttentionRefinement(c32 + extra, c)
        self.arm16 = AttentionRefinement(c16, c)
        self.conv_head32 = ConvX(c, c, 3)
        self.conv_head16 = ConvX(c, c, 3)
        self.ffm = FeatureFusion(c8 + c, fusion_channels)
        self.feature_channels = [c8, c, c, fusion_channels] + ([extra] if extra else [])
        # the original's head init: Kaiming normal with a=1 for every context-path conv
        for module in (self.conv_avg, self.arm32, self.arm16, self.conv_head32, self.conv_head16, self.ffm):
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, a=1)

    def load_pretrained(self, path: str | Path, name: str = "stdc") -> None:
        """ImageNet weights for the STDC network (:func:`load_stdc_checkpoint`); the context path
        and the text module keep their own initialisation."""
        load_stdc_checkpoint(self.stdc, path, name)

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        _, _, feat8, feat16, feat32 = self.stdc(img)
        score = None
        if self.text_guidance is not None:
            score = self.text_guidance(feat32)
            feat32 = torch.cat([feat32, score.to(feat32.dtype)], dim=1)
        # global context: GAP (functional, as in both implementations) -> 1x1 ConvBNReLU -> nearest up
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        ctx32 = self.arm32(feat32) + F.interpolate(avg, size=feat32.shape[-2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(ctx32, size=feat16.shape[-2:], mode="nearest"))
        ctx16 = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(ctx16, size=feat8.shape[-2:], mode="nearest"))
        outs = [feat8, feat16_up, feat32_up, self.ffm(feat8, feat16_up)]
        if score is not None:
            outs.append(score)
        return outs
