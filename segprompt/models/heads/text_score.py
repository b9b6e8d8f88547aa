"""The text auxiliary head of CLIP-distilled STDC-Seg (L_text, Sec. 3.2.1): the cosine score map S
of the text guidance, divided by a temperature of 0.07, is used as logits of a cross-entropy loss
after bilinear upsampling (align_corners=False) to the label (reference `VanillaHead`,
``docs/stdc_clip.md``, "Text guidance").

It has no parameters, so it shares only the interface of :class:`~segprompt.models.heads.base.DecodeHead`
(``forward(feats)``, ``loss(logits, label)``, ``in_index``, ``loss_weight``), not its classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.models.losses import CrossEntropyLoss


class TextScoreHead(nn.Module):
    """``forward(feats) = feats[in_index] / temperature``; ``feats[in_index]`` must be the score map
    S (``num_classes`` channels). ``align_corners`` is accepted with the other heads' arguments but
    the loss always resizes with ``align_corners=False``, as the reference does."""

    def __init__(self, in_channels: int, num_classes: int, in_index: int = -1, temperature: float = 0.07,
                 loss_weight: float = 1.0, align_corners: bool = False, loss: nn.Module | None = None,
                 ignore_index: int = 255):
        super().__init__()
        if in_channels != num_classes:
            raise SegpromptError(f"head 'text_score' reads the text score map S ({num_classes} channels, one per "
                                 f"class) but in_index {in_index} selects features with {in_channels} channels; "
                                 f"set in_index to the position of S in the backbone's outputs")
        if temperature <= 0:
            raise SegpromptError(f"head 'text_score': temperature must be > 0, got {temperature}")
        self.in_index = in_index
        self.temperature = temperature
        self.loss_weight = loss_weight
        self.align_corners = False
        self.loss_fn = loss if loss is not None else CrossEntropyLoss(ignore_index=ignore_index)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return inputs[self.in_index] / self.temperature

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return self.loss_weight * self.loss_fn(logits, label)
