"""Full fine-tuning and head-only tuning (SPM paper Tables 1-3, "Full-Tuning" and "Head-Tuning")."""

from __future__ import annotations

from torch import nn

from segprompt.tuning.base import TuningContext, TuningMethod, freeze


class FullTuning(TuningMethod):
    """Every parameter trains, except what a model freezes by construction (the CLIP text
    encoder behind learnable prompts stays frozen)."""

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        pass


class HeadTuning(TuningMethod):
    """The pretrained backbone is frozen (statistics included); decode and auxiliary heads train."""

    def __init__(self, bn_eval: bool = True):
        self.bn_eval = bn_eval

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        freeze(model.backbone, self.bn_eval)
