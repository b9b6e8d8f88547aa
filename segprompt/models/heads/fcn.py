"""FCN head (Long et al.) as MMSegmentation's `FCNHead`: n x (conv-BN-ReLU) then a 1x1 classifier."""

from __future__ import annotations

import torch
from torch import nn

from segprompt.models.heads.base import DecodeHead


class FCNHead(DecodeHead):
    """``loss_align_corners`` (recipe key): ``align_corners`` of the logits' resize before the loss
    when it differs from the model's ``align_corners`` (null = the model's). The STDC recipes set it
    false on the two auxiliary FCNs, as the CLIP-distilled paper's MMSegmentation fork does; true is
    the original STDC-Seg code (docs/conventions.md §2)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 2,
                 kernel_size: int = 3, dilation: int = 1, concat_input: bool = True,
                 dropout: float = 0.1, in_index: int = -1, loss_weight: float = 1.0,
                 align_corners: bool = False, loss: nn.Module | None = None,
                 loss_align_corners: bool | None = None):
        super().__init__(channels, num_classes, dropout, in_index, loss_weight, align_corners, loss,
                         loss_align_corners)
        pad = kernel_size // 2 * dilation
        convs: list[nn.Module] = []
        for i in range(num_convs):
            cin = in_channels if i == 0 else channels
            convs += [nn.Conv2d(cin, channels, kernel_size, padding=pad, dilation=dilation, bias=False),
                      nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.conv_cat = None
        if concat_input:
            self.conv_cat = nn.Sequential(
                nn.Conv2d(in_channels + channels, channels, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        if num_convs == 0 and in_channels != channels:
            raise ValueError("FCNHead with num_convs=0 needs in_channels == channels")

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = inputs[self.in_index]
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)
