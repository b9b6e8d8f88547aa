"""SETR's naive / progressive upsampling head (Zheng et al., CVPR 2021, §3.3) as MMSegmentation's
`SETRUPHead`: LayerNorm over the tokens (eps 1e-6) -> ``num_convs`` x (k x k conv-BN-ReLU, bilinear
x ``up_scale``) -> 1x1 classifier. The first conv maps in->channels, the others channels->channels.

SETR-PUP on ViT-L uses 4 convs at x2 (main) and 2 convs at x4 (three auxiliaries, ADE20K config);
the SPM paper's retinal head is 3 convs at x2 on ResNet-101-d8 (``docs/spm.md``, "Backbones and heads as
the paper counts them").
"""

from __future__ import annotations

import torch
from torch import nn

from segprompt.models.heads.base import DecodeHead


class SETRUPHead(DecodeHead):
    """``dropout`` defaults to 0, as in every SETR config (MMSegmentation's class default is 0.1)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 up_scale: int = 4, kernel_size: int = 3, dropout: float = 0.0, in_index: int = -1,
                 loss_weight: float = 1.0, align_corners: bool = False, loss: nn.Module | None = None):
        super().__init__(channels, num_classes, dropout, in_index, loss_weight, align_corners, loss)
        if kernel_size not in (1, 3) or num_convs < 1:
            raise ValueError(f"SETRUPHead needs kernel_size 1 or 3 and num_convs >= 1, got {kernel_size}, {num_convs}")
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        self.up_convs = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(in_channels if i == 0 else channels, channels, kernel_size,
                                    padding=kernel_size // 2, bias=False),
                          nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                          nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=align_corners))
            for i in range(num_convs)))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = inputs[self.in_index]
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.cls_seg(self.up_convs(x))
