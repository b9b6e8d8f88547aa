"""Frozen parts whose BatchNorm statistics must not move (docs/conventions.md §4).

A frozen backbone's BatchNorm layers (``bn_eval``) and CLIP's frozen text encoder stay in eval
mode when the model is put in training mode, and keep plain BatchNorm under DDP. The mark is
set and read only through these two functions. It is an attribute on the module, so it
survives ``copy.deepcopy`` and pickling.
"""

from __future__ import annotations

from torch import nn

_MARK = "_segprompt_keep_eval"


def keep_in_eval(module: nn.Module) -> None:
    """Mark ``module`` (and so everything below it) to stay in eval mode."""
    setattr(module, _MARK, True)


def kept_in_eval(module: nn.Module) -> bool:
    return getattr(module, _MARK, False)
