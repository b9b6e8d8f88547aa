"""Partial tuning: freeze the named sub-modules, train everything else.

The CLIP-distilled STDC-Seg's second stage (clip_stdc paper, Section 3.3; reference configs
``tuneprompt/*fixbackbone``) freezes the STDC backbone and trains the prompts, the context path,
the decoder and the heads. The reference gives the backbone lr 0 rather than freezing it, so
its BatchNorm statistics keep updating: ``bn_eval: false`` (the default here) does the same.
"""

from __future__ import annotations

from torch import nn

from segprompt.tuning.base import TuningContext, TuningMethod, freeze


class PartialTuning(TuningMethod):
    """``frozen`` lists module paths of the model (e.g. ``backbone.stdc``), or paths of parameters
    that belong to no sub-module (e.g. ``backbone.pos_embed``); each is frozen."""

    def __init__(self, frozen: list[str], bn_eval: bool = False):
        if not frozen:
            raise ValueError("frozen is empty: list the module paths to freeze (e.g. backbone.stdc), "
                                 "or use the method full")
        self.frozen = list(frozen)
        self.bn_eval = bn_eval

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        for path in self.frozen:
            if path in params and path not in modules:  # a bare parameter, e.g. a ViT's backbone.pos_embed
                params[path].requires_grad_(False)
                continue
            if path not in modules:
                near = sorted(n for n in modules if n and n.count(".") <= path.count(".") + 1)[:12]
                raise ValueError(f"frozen: the model has no module or parameter '{path}'; "
                                     f"modules near the top: {', '.join(near)}")
            freeze(modules[path], self.bn_eval)
