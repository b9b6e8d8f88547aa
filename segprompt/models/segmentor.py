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

    ``view`` (B, 5) says which part of the original image each input covers,
    ``(y0, x0, y1, x1, flipped)`` in normalised coordinates (the training crop, a sliding window, a
    flipped TTA pass; ``None`` = the whole image as it is; see docs/spm.md and
    :mod:`segprompt.data.view`). Each module in :attr:`view_users` (inserted by a tuning method,
    e.g. the SPM chain, whose M0 must follow the image) gets ``set_view(view)`` before the
    backbone runs and ``set_view(None)`` once it has run (so no view outlives its input).
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
        self.view_users: list[nn.Module] = []  # likewise: modules with set_view(view | None)

    def train(self, mode: bool = True) -> "EncoderDecoder":
        super().train(mode)
        if mode:
            for m in self.modules():
                if getattr(m, "keep_eval", False):
                    m.eval()
        return self

    def forward(self, img: torch.Tensor, label: torch.Tensor | None = None, *, view: torch.Tensor | None = None):
        for user in self.view_users:
            user.set_view(view)
        try:
            feats = self.backbone(img)
        finally:
            for user in self.view_users:
                user.set_view(None)
        logits = self.decode_head(feats)
        if label is None:
            return F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        losses = {"loss_seg": self.decode_head.loss(logits, label)}
        for i, head in enumerate(self.aux_heads):
            losses[f"loss_aux{i}"] = head.loss(head(feats), label)
        for provider in self.loss_providers:
            losses.update(provider.losses(label))
        return losses
