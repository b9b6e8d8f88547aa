"""STDC-Seg's detail head and detail aggregation loss (Fan et al., CVPR 2021, §3.3, Eq. 1-2), with the
original implementation's semantics, except for the Dice denominator (docs/conventions.md §3).

The head (3x3 ConvBNReLU 256 -> 64, 1x1 64 -> 1 without bias) predicts a boundary map from feat8
during training only. Its target comes from the label map: a Laplacian at strides 1, 2 and 4 marks
the pixels whose class id exceeds their neighbours' (the "inner" side of each class boundary), and
the three binarised maps are fused with fixed weights 0.6/0.3/0.1 and binarised again. The loss is
binary cross-entropy plus Dice on that target, with no ignore mask (pixels labelled 255 take part,
as in the original). The Dice denominator is the CLIP-distilled paper's sum p^2 + sum t^2 by default
(``dice_denominator: squared``); ``linear`` is the original STDC code's sum p + sum t.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.models.backbones.stdc import ConvX
from segprompt.models.heads.base import DecodeHead

_LAPLACIAN = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))
_FUSE = (0.6, 0.3, 0.1)  # strides 1, 2, 4; a fixed 1x1 conv in the original (declared a parameter, never trained)
_THRESHOLD = 0.1


def detail_target(label: torch.Tensor) -> torch.Tensor:
    """The binary boundary target ``(B, 1, H, W)`` of a label map ``(B, H, W)`` (class ids as float,
    255 included): Laplacian (zero padding) at strides 1, 2, 4, each clamped at >= 0; the strided
    maps nearest-upsampled to full size; each binarised at > 0.1; fused 0.6/0.3/0.1; binarised at > 0.1.
    (The stride-4 map alone weighs 0.1, which is not > 0.1: it never marks a pixel by itself.)"""
    x = label.unsqueeze(1).float()
    kernel = torch.tensor(_LAPLACIAN, dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    levels = []
    for stride in (1, 2, 4):
        edges = F.conv2d(x, kernel, stride=stride, padding=1).clamp_min(0)
        if stride > 1:
            edges = F.interpolate(edges, size=x.shape[-2:], mode="nearest")
        levels.append((edges > _THRESHOLD).to(x.dtype))
    fuse = torch.tensor(_FUSE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    fused = F.conv2d(torch.cat(levels, dim=1), fuse)
    return (fused > _THRESHOLD).to(x.dtype)


DiceDenominator = Literal["squared", "linear"]


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
              denominator: DiceDenominator = "squared") -> torch.Tensor:
    """Per image, averaged over the batch (docs/conventions.md §3):

    - ``squared`` (the CLIP-distilled paper's formula): 1 - (2 sum(p t) + s) / (sum p^2 + sum t^2 + s);
    - ``linear`` (the original STDC-Seg code): 1 - (2 sum(p t) + s) / (sum p + sum t + s);

    with s = ``smooth`` (1 in both). For a binary target t^2 = t, so the two differ only in p."""
    p, t = prob.flatten(1), target.flatten(1)
    if denominator == "squared":
        denom = (p * p).sum(1) + (t * t).sum(1)
    elif denominator == "linear":
        denom = p.sum(1) + t.sum(1)
    else:
        raise ValueError(f"dice denominator {denominator!r} is not 'squared' or 'linear'")
    return (1 - (2 * (p * t).sum(1) + smooth) / (denom + smooth)).mean()


class DetailHead(DecodeHead):
    """Detail head on feat8 (``in_index`` 0 of the ``stdc`` backbone); an auxiliary head of the recipe.

    The builder gives every head ``num_classes`` and the recipe's segmentation ``loss``; this head
    predicts one boundary channel and brings its own loss, so it accepts and ignores both.
    ``loss(logits, label)`` upsamples the logits bilinearly to the label (``align_corners`` from the
    model; the original and the reference fork use True) and returns
    ``loss_weight * (bce_weight * BCE + dice_weight * Dice)``. ``dice_denominator`` picks the Dice
    form (:func:`dice_loss`): ``squared`` (default, the paper's Eq.) or ``linear`` (the original
    STDC code); see docs/conventions.md §3.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64, in_index: int = 0,
                 loss_weight: float = 1.0, bce_weight: float = 1.0, dice_weight: float = 1.0,
                 dice_denominator: DiceDenominator = "squared",
                 align_corners: bool = True, loss: nn.Module | None = None):
        super().__init__(channels, 1, 0.0, in_index, loss_weight, align_corners, None)
        if dice_denominator not in ("squared", "linear"):
            raise ValueError(f"dice_denominator={dice_denominator!r} must be 'squared' or 'linear'")
        self.conv = ConvX(in_channels, channels, 3)
        self.conv_seg = nn.Conv2d(channels, 1, 1, bias=False)  # the original's 1x1 output has no bias
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.dice_denominator = dice_denominator

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.conv(inputs[self.in_index]))

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear",
                               align_corners=self.align_corners)
        target = detail_target(label)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = dice_loss(torch.sigmoid(logits), target, denominator=self.dice_denominator)
        return self.loss_weight * (self.bce_weight * bce + self.dice_weight * dice)
