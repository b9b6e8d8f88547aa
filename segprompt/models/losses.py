"""Segmentation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy with an ignore index.

    ``avg_non_ignore=False`` (MMSegmentation's default) divides the summed loss by all pixels,
    ignored ones included; ``True`` divides by the labelled pixels only. With the default the
    loss of a global batch is exactly the mean of equal-sized per-process losses, so DDP gives
    the same gradient as one process.
    """

    def __init__(self, ignore_index: int = 255, class_weight: list[float] | None = None,
                 avg_non_ignore: bool = False):
        super().__init__()
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore
        self.register_buffer("class_weight", None if class_weight is None else torch.tensor(class_weight),
                             persistent=False)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), label, weight=self.class_weight,
                               ignore_index=self.ignore_index, reduction="none")
        if self.avg_non_ignore:
            return loss.sum() / (label != self.ignore_index).sum().clamp_min(1)
        return loss.mean()
