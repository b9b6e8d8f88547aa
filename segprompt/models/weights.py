"""Local pretrained backbone files: read one, then load it strictly (nothing is downloaded).

A backbone's ``load_pretrained(path, name)`` reads the file with :func:`read_state_dict`, renames its
keys to the backbone's own and drops what the format carries but the backbone never runs (an
ImageNet classifier), then calls :func:`load_strict`. Any other difference is an error that lists
the keys, because a silently half-loaded backbone trains to a plausible but wrong result
(``docs/checkpoints.md``, "Pretrained backbone and CLIP files").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from segprompt.errors import SegpromptError, torch_load_reason

_SHOWN = 20  # keys listed per kind of mismatch


def read_state_dict(path: str | Path, name: str, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from ``state_dict``/``model`` and stripped of a
    ``backbone.`` prefix that every key carries. Errors call the backbone ``name`` (the recipe's
    ``model.backbone.name``) and describe the expected file as ``kind``."""
    p = Path(path)
    if not p.is_file():
        raise SegpromptError(
            f"pretrained weights '{p}' do not exist. Put the {name} checkpoint file there ({kind}); nothing is "
            f"downloaded")
    if p.suffix == ".safetensors":  # Hugging Face's format (timm's hub files): no pickle at all
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unprefixed(load_file(p, device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise SegpromptError(f"pretrained weights '{p}' cannot be read as safetensors ({e}): it is truncated "
                                 f"or not a .safetensors file") from None
    state = unwrap_state_dict(torch_file(p, f"pretrained weights '{p}'", "not a PyTorch checkpoint"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SegpromptError(f"pretrained weights '{p}' are not a state dict of tensors")
    return _unprefixed(state)


def torch_file(path: Path, what: str, expected: str) -> Any:
    """What a ``torch.load``-able file holds (tensors and plain data only: ``weights_only``); a file
    that cannot be read is an error that calls it ``what`` and says it is truncated, corrupt or
    ``expected``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: any of pickle's and zipfile's errors
        raise SegpromptError(f"{what} cannot be read ({torch_load_reason(e)}): it is truncated, corrupt or "
                             f"{expected}") from None


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items()}
    return dict(state)


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{keys[:_SHOWN]}{more}"


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, name: str,
                hint: str = "", *, target: str | None = None, keys: str = "keys") -> None:
    """Copy ``state`` into ``module``; missing keys, unexpected keys and other shapes are a
    :class:`SegpromptError` that lists them (``hint`` is appended; ``target`` names what the file
    should fit, default "backbone '<name>'"; ``keys`` names the keys, e.g. "text keys"). Only
    BatchNorm's ``num_batches_tracked`` counter may be absent: torchvision's ImageNet files predate it."""
    own = module.state_dict()
    missing = sorted(k for k in own.keys() - state.keys() if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = [f"{len(missing)} missing {keys} {_listed(missing)}",
                    f"{len(unexpected)} unexpected {keys} {_listed(unexpected)}"]
        if shapes:
            problems.append(f"{len(shapes)} tensors of other shapes (file vs model) {_listed(shapes)}")
        target = target or f"backbone '{name}'"
        raise SegpromptError(f"pretrained weights '{path}' do not fit {target}: "
                             + ", ".join(problems) + hint)
    module.load_state_dict(state, strict=False)


def unwrap_state_dict(state: Any) -> Any:
    """The state dict inside a checkpoint that wraps it (``{"state_dict": ...}`` as MMSeg saves,
    ``{"model": ...}`` as timm and segprompt do); anything else is returned as is."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state

