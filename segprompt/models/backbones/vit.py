"""Vision Transformer (Dosovitskiy et al., ICLR 2021) as MMSegmentation's `VisionTransformer` in SETR
(``docs/spm.md``, "Backbones and heads as the paper counts them"): qkv bias, LayerNorm eps 1e-6, a cls token, no patch norm, no
final norm. ViT-L/16 at 512x512 (the defaults) holds 304,147,456 parameters; ViT-B/16 is
``embed_dim=768, depth=12, num_heads=12``.

:meth:`VisionTransformer.forward` returns the token grids (B, C, H/16, W/16) of the layers in
``out_indices``. The hook contract is ResNet's: the ``depth`` layers split evenly into
``num_stages`` stages, and a tuning method may set :attr:`VisionTransformer.stage_hook`, called as
``hook(i, grid)`` on the token grid at the input of stage ``i`` and as ``hook(num_stages, grid)``
on the last layer's output (the cls token passes by unchanged). ``stage_starts`` gives uneven
stages instead, e.g. ``(0, 4, 8, 11)`` for the recognition appendix's SPMs before layers 1, 5, 9
and 12 of ViT-B.

Two more tuning slots, both empty until a method fills them:

- ``prompt_tokens`` (depth, n, C), VPT-deep's per-layer prompts: layer ``i`` sees
  ``[cls, prompt_tokens[i], patches]`` and its prompt outputs are dropped after it.
- ``Block.adapter``, AdaptFormer's bottleneck beside each block's MLP: the block adds
  ``adapter(x)`` to the MLP branch, where ``x`` is the MLP branch's input before LayerNorm.

:func:`load_vit_checkpoint` loads timm-format files (``blocks.N.*``; ImageNet-21k ViT-L/16 at 384)
and MMSegmentation-converted ones (``layers.N.ln1``, ``attn.attn.in_proj_weight``,
``ffn.layers.*``), resizing the position embedding to the model's grid (e.g. 24x24 -> 32x32).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.models.backbones.base import TokenBackbone
from segprompt.models.weights import load_strict, read_state_dict


class Block(nn.Module):
    """timm's pre-norm encoder layer, built from timm's own ``Attention`` and ``Mlp`` under timm's
    names (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp.fc1``,
    ``mlp.fc2``, ``ls2``, ``drop_path2``: timm's state dicts load unchanged), with an optional
    parallel ``adapter`` on the MLP branch (AdaptFormer §3.2: x + drop_path(MLP(LN(x))) + adapter(x)).

    Composed rather than subclassed from timm's ``Block`` so that importing this module does not
    import timm, which imports torchvision (seconds at every CLI start; docs/cli.md)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_rate: float, drop_path: float):
        super().__init__()
        from timm.layers import Attention, DropPath, Mlp

        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True, proj_drop=drop_rate)
        self.ls1 = nn.Identity()  # timm's LayerScale slot: off in ViT/SETR (no init_values)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop_rate)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.register_module("adapter", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        out = self.drop_path2(self.mlp(self.norm2(x)))
        if self.adapter is not None:
            out = out + self.adapter(x)
        return x + out


def resize_pos_embed(pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int],
                     mode: str) -> torch.Tensor:
    """(1, 1 + h*w, C) on ``src_grid`` -> (1, 1 + H*W, C) on ``dst_grid``; the cls entry is kept."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, *src_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=dst_grid, mode=mode, align_corners=False).to(pos_embed.dtype)
    return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


def _to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w)


def _hooked(hook: nn.Module, slot: int, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    grid = hook(slot, _to_grid(x, h, w))
    return torch.cat([x[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


class VisionTransformer(TokenBackbone):
    """``img_size`` fixes the position-embedding grid; other input sizes use a copy resized with
    ``interpolate_mode``, as MMSegmentation does. Inputs are padded bottom-right to a multiple of
    the patch size. ``drop_rate`` is the dropout after the position embedding and in the attention
    projection and MLP; ``drop_path_rate`` grows linearly to the last layer."""

    def __init__(self, img_size: int | tuple[int, int] = 512, patch_size: int = 16, in_channels: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 out_indices: tuple[int, ...] = (9, 14, 19, 23), num_stages: int = 1,
                 stage_starts: tuple[int, ...] | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 interpolate_mode: Literal["bicubic", "bilinear"] = "bicubic"):
        super().__init__()
        if stage_starts is not None:
            starts = list(stage_starts)
            if not starts or starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= depth:
                raise ValueError(f"stage_starts={tuple(stage_starts)} must be increasing layer indices "
                                 f"in 0..{depth - 1} starting at 0")
            num_stages = len(starts)
        elif num_stages < 1 or depth % num_stages:
            raise ValueError(f"num_stages={num_stages} must divide the {depth} layers evenly")
        else:
            starts = [i * (depth // num_stages) for i in range(num_stages)]
        self.stage_starts = tuple(starts)
        if list(out_indices) != sorted(set(out_indices)) or not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices={tuple(out_indices)} must be increasing layer indices in 0..{depth - 1}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_stages = num_stages
        self.out_indices = tuple(out_indices)
        self.interpolate_mode = interpolate_mode
        from timm.layers import PatchEmbed

        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_channels, embed_dim, output_fmt="NCHW",
                                      strict_img_size=False, dynamic_img_pad=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1] + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop_rate, r) for r in rates)
        self.register_parameter("prompt_tokens", None)
        self.stage_hook: nn.Module | None = None
        self.stage_in_channels = [embed_dim] * num_stages
        self.out_channels = [embed_dim] * len(self.out_indices)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.ModuleList]:
        ends = [*self.stage_starts[1:], self.depth]
        return [self.blocks[a:b] for a, b in zip(self.stage_starts, ends)]

    @property
    def slot_channels(self) -> list[int]:
        """Channels at each hook slot: every stage's input, then the last layer's output."""
        return [self.embed_dim] * (self.num_stages + 1)

    @property
    def feature_channels(self) -> list[int]:
        """Channels of each tensor :meth:`forward` returns (what a head's ``in_index`` picks)."""
        return list(self.out_channels)

    def adapter_blocks(self) -> list[Block]:
        return list(self.blocks)

    def load_pretrained(self, path: str | Path, name: str = "vit") -> None:
        """Load a timm or MMSegmentation checkpoint strictly (:func:`load_vit_checkpoint`); errors
        call the backbone ``name``."""
        load_vit_checkpoint(self, path, name)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == self.grid_size:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.grid_size, (h, w), self.interpolate_mode)

    def _layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.prompt_tokens is None:
            return self.blocks[i](x)
        prompts = self.prompt_tokens[i].expand(x.shape[0], -1, -1)
        x = self.blocks[i](torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1))
        return torch.cat([x[:, :1], x[:, 1 + prompts.shape[1]:]], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        b, _, h, w = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = self.pos_drop(x + self._pos_embed(h, w))
        hook = self.stage_hook
        stage_of = {start: i for i, start in enumerate(self.stage_starts)}
        outs = []
        for i in range(self.depth):
            if hook is not None and i in stage_of:
                x = _hooked(hook, stage_of[i], x, h, w)
            x = self._layer(i, x)
            if hook is not None and i == self.depth - 1:
                x = _hooked(hook, self.num_stages, x, h, w)
            if i in self.out_indices:
                outs.append(_to_grid(x, h, w))
        return outs


# MMSegmentation's converted names (tools/model_converters/vit2mmseg.py) -> timm's, which are ours.
_MMSEG_NAMES = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^layers\.(\d+)\.attn\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
]
# The classifier side, never run by a segmentation backbone: timm's final norm, pooled-token norm,
# pre-logits and head; MMSegmentation's final norm ("ln1" at the top level).
_UNUSED = ("norm.", "fc_norm.", "pre_logits.", "head.", "ln1.")


def _timm_name(key: str) -> str:
    for pattern, repl in _MMSEG_NAMES:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


def load_vit_checkpoint(model: VisionTransformer, path: str | Path, name: str = "vit") -> None:
    """Load a timm-format or MMSegmentation-converted ViT checkpoint strictly, resizing a square
    position-embedding grid of another size to the model's with ``model.interpolate_mode``."""
    kind = "a timm or MMSegmentation ViT file, e.g. ImageNet-21k ViT-L/16 at 384"
    state = {_timm_name(k): v for k, v in read_state_dict(path, name, kind).items() if not k.startswith(_UNUSED)}
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape != model.pos_embed.shape:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1 and pos.shape[2] == model.embed_dim:
            state["pos_embed"] = resize_pos_embed(pos, (side, side), model.grid_size, model.interpolate_mode)
    load_strict(model, state, path, name)
