"""PSPNet's pyramid pooling head (Zhao et al., CVPR 2017, §3.2) as MMSegmentation's `PSPHead`.

Each pool scale s: adaptive average pool to s x s -> 1x1 conv-BN-ReLU in->channels -> bilinear
upsample back. The input and the pooled maps are concatenated (in + len(scales)·channels) ->
3x3 conv-BN-ReLU -> dropout -> 1x1 classifier. Convs followed by BN carry no bias
(``docs/spm.md``, "Backbones and heads as the paper counts them").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.models.heads.base import DecodeHead


def _conv_bn_relu(cin: int, cout: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PSPHead(DecodeHead):
    def __init__(self, in_channels: int, num_classes: int, channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), dropout: float = 0.1, in_index: int = -1,
                 loss_weight: float = 1.0, align_corners: bool = False, loss: nn.Module | None = None):
        super().__init__(channels, num_classes, dropout, in_index, loss_weight, align_corners, loss)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_bn_relu(in_channels, channels, 1)) for s in pool_scales)
        self.bottleneck = _conv_bn_relu(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = inputs[self.in_index]
        pooled = [F.interpolate(m(x), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
                  for m in self.psp_modules]
        return self.cls_seg(self.bottleneck(torch.cat([x, *pooled], dim=1)))
