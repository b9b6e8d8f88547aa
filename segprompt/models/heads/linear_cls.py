"""Linear classification head for the SPM paper's recognition appendix (Table 9).

The ViT-B of the appendix is MAE-pre-trained and fine-tuned as AdaptFormer does, with MAE's
"global pool" head: the patch tokens of the last layer averaged, a LayerNorm (``fc_norm``,
eps 1e-6) and one linear layer. ``norm=False`` drops the LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearClsHead(nn.Module):
    """``forward(feats)`` -> (B, K) logits from ``feats[in_index]`` (B, C, h, w)."""

    task = "recognition"

    def __init__(self, in_channels: int, num_classes: int, norm: bool = True, dropout: float = 0.0,
                 in_index: int = -1, loss_weight: float = 1.0, align_corners: bool = False,
                 loss: nn.Module | None = None, init_std: float = 0.02):
        super().__init__()
        self.in_index = in_index
        self.loss_weight = loss_weight
        self.loss_fn = loss
        self.fc_norm = nn.LayerNorm(in_channels, eps=1e-6) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=init_std)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[self.in_index].mean(dim=(2, 3))
        return self.fc(self.dropout(self.fc_norm(x)))

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * self.loss_fn(logits, label)
