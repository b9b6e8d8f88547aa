"""The tuning-method interface (PEFT's "tuner" idea for segmentation).

A method takes a built :class:`~segprompt.models.segmentor.EncoderDecoder`, decides what trains,
may insert modules, and may add loss terms (through ``model.extra_losses``). It runs before the
model is moved to its device or wrapped in DDP, so frozen parameters are frozen before wrapping.
"""

from __future__ import annotations

from torch import nn


def freeze(module: nn.Module, bn_eval: bool = True) -> None:
    """No gradient, so no optimizer state; with ``bn_eval`` BatchNorm statistics stay as loaded."""
    module.requires_grad_(False)
    if bn_eval:
        module.keep_eval = True


class TuningMethod:
    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError
