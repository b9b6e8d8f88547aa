"""Bias-Tuning (BitFit, Ben Zaken et al.; SPM paper Tables 1-3 and 8): only the backbone's biases train.

The rule is every backbone parameter named ``*.bias``. On ResNet, whose convs have no bias, that
is the BatchNorm shifts beta (52,736 at depth 101); on a ViT it is every Linear, LayerNorm and
patch-embedding bias. Heads train as usual.
"""

from __future__ import annotations

from torch import nn

from segprompt.tuning.base import TuningContext, TuningMethod, freeze


class BiasTuning(TuningMethod):
    """``bn_eval`` (default) keeps the backbone's BatchNorm statistics at their pretrained values,
    so only counted parameters change and the frozen weights see the statistics they were trained
    with; ``bn_eval: false`` lets the running statistics follow the new data (they are then saved
    in checkpoints, as buffers of modules in training mode)."""

    def __init__(self, bn_eval: bool = True):
        self.bn_eval = bn_eval

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        freeze(model.backbone, self.bn_eval)
        for name, p in model.backbone.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)
