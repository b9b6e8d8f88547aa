"""Encoder-decoder segmentor: backbone features -> decode head (+ auxiliary heads at training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.models.frozen import kept_in_eval
from segprompt.models.heads.base import DecodeHead
from segprompt.models.inserted import Inserted


class EncoderDecoder(nn.Module):
    """``forward(img)`` returns the main head's logits resized to the input; ``forward(img, label)``
    returns the dict of weighted losses: main head, every auxiliary head, and the terms of each
    module in :attr:`inserted` (modules a tuning method inserted and registered with :meth:`insert`,
    :class:`~segprompt.models.inserted.Inserted`: e.g. the SPM's interim semantic maps, Eq. 5).

    Modules marked with :func:`~segprompt.models.frozen.keep_in_eval` (frozen parts whose BatchNorm statistics must not move)
    stay in eval mode when the model is put in training mode.

    ``view`` (B, 5) says which part of the original image each input covers,
    ``(y0, x0, y1, x1, flipped)`` in normalised coordinates (the training crop, a sliding window, a
    flipped TTA pass; ``None`` = the whole image as it is; see docs/spm.md and
    :mod:`segprompt.data.view`). Each module in :attr:`inserted` (e.g. the SPM chain, whose M0 must
    follow the image) gets ``set_view(view)`` before the backbone runs and ``set_view(None)`` once
    it has run (so no view outlives its input).
    """

    task = "segmentation"

    def __init__(self, backbone: nn.Module, decode_head: DecodeHead, aux_heads: list[DecodeHead] = (),
                 align_corners: bool = False):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_heads = nn.ModuleList(aux_heads)
        self.align_corners = align_corners
        self.inserted: list[Inserted] = []  # registered by tuning methods; they live elsewhere in the tree

    def insert(self, module: Inserted) -> None:
        """Register a module a tuning method put into the tree (it is not owned here: no parameters
        are added by registering)."""
        if not isinstance(module, Inserted):
            raise TypeError(f"{type(module).__name__} does not implement segprompt.models.inserted.Inserted")
        self.inserted.append(module)

    def train(self, mode: bool = True) -> "EncoderDecoder":
        super().train(mode)
        if mode:
            for m in self.modules():
                if kept_in_eval(m):
                    m.eval()
        return self

    def forward(self, img: torch.Tensor, label: torch.Tensor | None = None, *, view: torch.Tensor | None = None):
        for module in self.inserted:
            module.set_view(view)
        try:
            feats = self.backbone(img)
        finally:
            for module in self.inserted:
                module.set_view(None)
        logits = self.decode_head(feats)
        if label is None:
            return F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        losses = {"loss_seg": self.decode_head.loss(logits, label)}
        for i, head in enumerate(self.aux_heads):
            losses[f"loss_aux{i}"] = head.loss(head(feats), label)
        for module in self.inserted:
            losses.update(module.losses(label))
        return losses
