"""Image classifier: backbone features -> classification head (SPM paper, appendix, Table 9).

The same contract as :class:`~segprompt.models.segmentor.EncoderDecoder`, so the training loop,
the tuning methods and the parameter counter treat both alike: ``forward(img)`` returns (B, K)
logits and ``forward(img, label)`` the dict of losses (the head's and those of
``inserted`` modules, e.g. the SPM's interim category vectors).
"""

from __future__ import annotations

import torch

from segprompt.models.segmentor import EncoderDecoder


class ImageClassifier(EncoderDecoder):
    task = "recognition"

    def forward(self, img: torch.Tensor, label: torch.Tensor | None = None, *, view: torch.Tensor | None = None):
        # ``view`` is accepted for the shared contract and ignored: recognition has no geometry
        logits = self.decode_head(self.backbone(img))
        if label is None:
            return logits
        losses = {"loss_cls": self.decode_head.loss(logits, label)}
        for module in self.inserted:
            losses.update(module.losses(label))
        return losses
