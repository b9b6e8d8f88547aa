"""What every decode head shares: input selection, dropout + 1x1 classifier, and its weighted loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DecodeHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, dropout: float, in_index: int,
                 loss_weight: float, align_corners: bool, loss: nn.Module | None,
                 loss_align_corners: bool | None = None):
        super().__init__()
        self.in_index = in_index
        self.loss_weight = loss_weight
        self.align_corners = align_corners
        # align_corners of the resize before the loss; None = ``align_corners`` (the model's), a
        # bool overrides it for this head only (STDC's auxiliary FCNs: docs/conventions.md §2)
        self.loss_align_corners = loss_align_corners
        self.loss_fn = loss
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    @property
    def loss_resize_align_corners(self) -> bool:
        """``align_corners`` of the bilinear resize in :meth:`loss`."""
        return self.align_corners if self.loss_align_corners is None else self.loss_align_corners

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Upsample the logits to the label (as MMSegmentation does) and apply the weighted loss."""
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear",
                               align_corners=self.loss_resize_align_corners)
        return self.loss_weight * self.loss_fn(logits, label)
