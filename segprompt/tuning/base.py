"""The tuning-method interface (PEFT's "tuner" idea for segmentation).

A method takes a built :class:`~segprompt.models.segmentor.EncoderDecoder`, decides what trains,
may insert modules, and may add loss terms (by appending a module with a ``losses(label)`` method
with ``model.insert``). It runs before the model is moved to its device or wrapped in DDP,
so frozen parameters are frozen before wrapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.models.backbones.base import TokenBackbone
from segprompt.models.frozen import keep_in_eval


@dataclass
class TuningContext:
    """What a method may need to know about the task (filled in by the builder, segprompt/build.py)."""

    num_classes: int
    ignore_index: int = 255
    # per-pixel class prior of the training split at a given square resolution, shape (K, res, res)
    class_prior: Callable[[int], np.ndarray] | None = None


# "% of full" and the oversize warning, for every tuning method (docs/measurement.md, "% of full").
# Here, not in segprompt/measure/params.py (which re-exports them), because the training log
# (segprompt/training) must not import segprompt.measure (tests/test_layout.py).
def percent_of_full(trainable: int, full: int) -> float:
    """THE "% of full" of count-params, the training log and the demo: 100 x the parameters a run
    trains / the parameters full tuning trains, i.e. those of the same network as built, before a
    tuning method inserted or froze anything (backbone and heads; a part the model freezes by
    construction, such as a CLIP text encoder, is not in it), both counted as every parameter
    (BatchNorm included: what the optimizer updates and a checkpoint stores)."""
    if full <= 0:
        raise ValueError(f"full tuning's parameter count must be positive, got {full}")
    return 100.0 * trainable / full


@dataclass(frozen=True)
class FullShare:
    """A tuned model's parameters against full tuning's, every parameter counted."""

    trainable: int  # parameters the run trains
    full: int  # parameters full tuning trains: the trainable ones of the network as built, nothing inserted
    inserted: int  # parameters the tuning method inserted (SPMs, adapters, prompt tokens, ...)

    @property
    def percent(self) -> float:
        return percent_of_full(self.trainable, self.full)


def full_share(model: nn.Module, untuned: Iterable[nn.Parameter]) -> FullShare:
    """``model`` as tuned, against ``untuned``: the parameters of the same network as built, before
    its tuning method ran, with the ``requires_grad`` they were built with (a second build or a copy,
    e.g. on the meta device). Tuning methods insert modules and never remove any."""
    untuned = list(untuned)
    params = list(model.parameters())
    return FullShare(trainable=sum(p.numel() for p in params if p.requires_grad),
                     full=sum(p.numel() for p in untuned if p.requires_grad),
                     inserted=sum(p.numel() for p in params) - sum(p.numel() for p in untuned))


def oversize_warning(inserted: int, full: int, fix: str) -> str | None:
    """The warning when the inserted modules outnumber full tuning's parameters (else None)."""
    if inserted <= full:
        return None
    many = f"{inserted / full:.2f} times as many as" if full > 0 else "more than"
    return (f"the tuning method inserts {inserted:,} parameters, {many} full "
            f"tuning trains ({full:,}: the network without them), so it is not parameter-efficient on this "
            f"network: {fix}")


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
                keep_in_eval(m)


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
