"""The tuning-method interface (PEFT's "tuner" idea for segmentation).

A method takes a built :class:`~segprompt.models.segmentor.EncoderDecoder`, decides what trains,
may insert modules, and may add loss terms (by appending a module with a ``losses(label)`` method
to ``model.loss_providers``). It runs before the model is moved to its device or wrapped in DDP,
so frozen parameters are frozen before wrapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.models.backbones.base import TokenBackbone


@dataclass
class TuningContext:
    """What a method may need to know about the task (filled in by the engine)."""

    num_classes: int
    ignore_index: int = 255
    # per-pixel class prior of the training split at a given square resolution, shape (K, res, res)
    class_prior: Callable[[int], np.ndarray] | None = None


def freeze(module: nn.Module, bn_eval: bool = True) -> None:
    """No gradient, so no optimizer state; with ``bn_eval`` its BatchNorm layers stay in eval mode,
    so their statistics stay as loaded. The flag sits on each norm layer rather than on ``module``,
    so modules inserted into a frozen part later (prompts, adapters) still train normally.

    ``bn_eval=True`` is our default for frozen backbones (the tuning methods' ``bn_eval`` option);
    MMSegmentation's ``norm_eval=False`` would keep updating the running statistics, which
    ``bn_eval: false`` reproduces (the STDC stage-2 recipes do). See docs/conventions.md §4."""
    module.requires_grad_(False)
    if bn_eval:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.keep_eval = True


def vit_backbone(model: nn.Module, method: str, what: str) -> TokenBackbone:
    """``model.backbone`` if it is a ViT (ours or timm's); else an error saying the method (which
    ``what``) needs one."""
    vit = model.backbone
    if not isinstance(vit, TokenBackbone):
        raise SegpromptError(f"tuning '{method}' {what}, but the backbone is '{type(vit).__name__}'; "
                             f"use model.backbone.name: vit, or timm with a ViT model")
    return vit


class TuningMethod:
    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        raise NotImplementedError
