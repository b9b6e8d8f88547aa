"""Encoder-decoder segmentor: backbone features -> decode head (+ auxiliary heads at training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.models.heads.base import DecodeHead


class EncoderDecoder(nn.Module):
    """``forward(img)`` returns the main head's logits resized to the input; ``forward(img, label)``
    returns the dict of weighted losses: main head, every auxiliary head, and the terms of each
    module in :attr:`loss_providers` (modules a tuning method inserted that have a
    ``losses(label) -> dict`` method, e.g. the SPM's interim semantic maps, Eq. 5).

    Modules flagged ``keep_eval = True`` (frozen parts whose BatchNorm statistics must not move)
    stay in eval mode when the model is put in training mode.
    """

    task = "segmentation"

    def __init__(self, backbone: nn.Module, decode_head: DecodeHead, aux_heads: list[DecodeHead] = (),
                 align_corners: bool = False):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_heads = nn.ModuleList(aux_heads)
        self.align_corners = align_corners
        self.loss_providers: list[nn.Module] = []  # registered elsewhere in the tree, not owned here

    def train(self, mode: bool = True) -> "EncoderDecoder":
        super().train(mode)
        if mode:
            for m in self.modules():
                if getattr(m, "keep_eval", False):
                    m.eval()
        return self

    def forward(self, img: torch.Tensor, label: torch.Tensor | None = None):
        feats = self.backbone(img)
        logits = self.decode_head(feats)
        if label is None:
            return F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        losses = {"loss_seg": self.decode_head.loss(logits, label)}
        for i, head in enumerate(self.aux_heads):
            losses[f"loss_aux{i}"] = head.loss(head(feats), label)
        for provider in self.loss_providers:
            losses.update(provider.losses(label))
        return losses
