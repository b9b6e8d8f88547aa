"""Any timm model as a frozen, staged backbone (``model.backbone.name: timm``; docs/timm.md).

The SPM paper's claim is that stage-wise prompting is generic to the architecture (§3.1); this
module lets every tuning method attach to a timm network the way it attaches to our ResNet and ViT
(:mod:`segprompt.models.backbones.base`). timm builds the network (``timm.create_model`` with
``pretrained=False``: weights come from a local file only) and runs it with its own
``forward_intermediates``; its classifier is pruned, since it never runs. The stage hook is
attached with forward hooks on timm's own modules, so no timm code is copied or re-ordered:

- **CNNs and hierarchical models** (:class:`TimmBackbone`): the stages are the model's
  ``feature_info`` (EfficientNet-Lite0: ``blocks.0/1/2/4/6``, 16/24/40/112/320 channels). Slot
  ``i`` is the output of feature module ``i``, i.e. the input of the stage after it; the last slot
  is the last feature's output. The features ``forward`` returns are taken after their slot's hook.
  ``output_stride`` 8 or 16 goes to timm (dilated stages) where the model takes it. Adapter's
  paths go on the blocks :meth:`TimmBackbone.conv_blocks` finds (timm's own block groups).
- **ViTs** (:class:`TimmViT`): ``depth`` blocks split into ``num_stages`` even groups, as our
  own ViT; every block runs, whatever ``out_indices`` picks; slot ``i`` is the token grid at the
  input of stage ``i``, the last slot the last block's output. Prefix tokens (cls, registers) pass
  the hook unchanged. VPT-deep's prompts are inserted after the prefix tokens at each block and
  dropped after it (not in rope models, whose attention wants exactly the patch tokens there);
  AdaptFormer's adapter reads the MLP branch's input (before ``norm2``) and is added after the
  branch's LayerScale and drop-path, as in AdaptFormer and our own ViT (pre-norm ``Block`` and
  ``EvaBlock`` only: a post-norm block runs ``norm2`` after its MLP).

BatchNorm layers are timm's (``BatchNormAct2d`` is a ``BatchNorm2d``), so freezing keeps them in
eval mode as for every other backbone.
"""

from __future__ import annotations

import difflib
import math
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segprompt.models.backbones.base import BlockBackbone, TokenBackbone
from segprompt.models.backbones.efficientnet_pytorch import (
    from_efficientnet_pytorch,
    is_efficientnet_pytorch,
)
from segprompt.models.weights import load_strict, read_state_dict


def _timm():
    import timm  # here, not at the top: only recipes with a timm backbone pay its import

    return timm


def _prenorm_blocks() -> tuple[type, ...]:
    """timm's ViT blocks computing ``x + drop_path2(scale(mlp(norm2(x))))``, the branch AdaptFormer adds to."""
    from timm.models.eva import EvaBlock
    from timm.models.vision_transformer import Block

    return Block, EvaBlock


def _token_classes() -> tuple[type, ...]:
    """timm's ViT families whose blocks see (B, prefix + H*W, C) token sequences."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva


def create_body(model: str, output_stride: int | None, in_channels: int, drop_path_rate: float,
                model_args: dict[str, Any]) -> nn.Module:
    """``timm.create_model(model, pretrained=False, ...)``; a name or stride timm refuses is a
    ``ValueError`` that says what is possible."""
    timm = _timm()
    if not timm.is_model(model):
        near = difflib.get_close_matches(model, timm.list_models(), n=4, cutoff=0.6)
        hint = (f"; close names: {', '.join(near)}" if near
                else "; `python -c \"import timm; print(timm.list_models('*lite*'))\"` lists names")
        raise ValueError(f"timm has no model {model!r} (timm {timm.__version__}){hint}")
    kwargs = dict(model_args, in_chans=in_channels)
    if drop_path_rate:  # only when asked: some constructors (GhostNet) take no drop_path_rate
        kwargs["drop_path_rate"] = drop_path_rate
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    try:
        return timm.create_model(model, pretrained=False, **kwargs)
    except TypeError as e:
        if output_stride is not None and "output_stride" in str(e):
            raise ValueError(f"timm model {model!r} cannot change its output stride (its constructor takes no "
                             f"output_stride); leave output_stride unset") from None
        raise ValueError(f"timm model {model!r} refuses its arguments {sorted(kwargs)}: {e}") from None
    except AssertionError as e:  # timm asserts on a stride it cannot give, e.g. 4
        why = f" ({e})" if str(e) else ""
        raise ValueError(f"timm model {model!r} cannot give output_stride {output_stride}{why}; use 8, 16 or 32, "
                         f"or leave it unset") from None


def _check_stride(body: nn.Module, model: str, output_stride: int | None) -> None:
    got = max(f["reduction"] for f in body.feature_info)
    if output_stride is not None and got != output_stride:
        raise ValueError(f"timm model {model!r} gives output stride {got}, not the requested {output_stride}; "
                         f"use {got} or leave output_stride unset")


def _nchw_call(hook: nn.Module, slot: int, x: torch.Tensor, channels: int) -> torch.Tensor:
    """``hook(slot, x)`` on an NCHW view of ``x``; NHWC features (Swin-like stages) go back as NHWC."""
    if x.ndim == 4 and x.shape[1] != channels and x.shape[-1] == channels:
        return hook(slot, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return hook(slot, x)


def _slot_output(owner: "TimmBackbone", slot: int, module: nn.Module, args: tuple, out: torch.Tensor):
    if owner.stage_hook is None:
        return out
    return _nchw_call(owner.stage_hook, slot, out, owner.slot_channels[slot])


class TimmBackbone(BlockBackbone):
    """A timm CNN (or any model with ``feature_info`` and ``forward_intermediates``), staged by its
    ``feature_info``. ``out_indices`` picks which features :meth:`forward` returns (default all);
    ``model_args`` go to ``timm.create_model`` as they are."""

    def __init__(self, model: str, output_stride: int | None = None, out_indices: list[int] | None = None,
                 drop_path_rate: float = 0.0, model_args: dict[str, Any] | None = None, in_channels: int = 3):
        super().__init__()
        self.model_name = model
        self.in_channels = in_channels
        self._create = partial(create_body, model, output_stride, in_channels, drop_path_rate, dict(model_args or {}))
        body = self._create()
        if isinstance(body, _token_classes()):
            raise ValueError(f"timm model {model!r} is a ViT; it is built by TimmViT (timm_backbone())")
        if not hasattr(body, "forward_intermediates") or not getattr(body, "feature_info", None):
            raise ValueError(f"timm model {model!r} exposes no feature_info/forward_intermediates, so its stages "
                             f"are unknown; choose a model with features_only support")
        _check_stride(body, model, output_stride)
        self._keep = list(range(len(body.feature_info)))
        self.body, self.dropped_keys = _pruned(body, self._keep)
        info = body.feature_info
        self.slot_channels = [int(f["num_chs"]) for f in info]
        self.stage_modules = [f["module"] for f in info]
        self.out_indices = _indices(out_indices, len(info))
        self.stage_hook: nn.Module | None = None
        modules = dict(self.body.named_modules())
        for slot, name in enumerate(self.stage_modules):
            modules[name].register_forward_hook(partial(_slot_output, self, slot))

    @property
    def feature_channels(self) -> list[int]:
        return [self.slot_channels[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)

    def conv_blocks(self) -> list[tuple[str, nn.Module, int]]:
        """timm's own blocks: the modules its ``group_matcher(coarse=False)`` names as block groups
        (the units of timm's layer-wise learning-rate decay: ``blocks.S.J`` in EfficientNet and
        MobileNet, ``layerS.J`` in ResNet, ``stages.S.blocks.J`` and ``stages.S.downsample`` in
        ConvNeXt), the stem left out, in the order they run. A block need not have a skip
        connection (EfficientNet's strided blocks have none). C_out is read from what each block
        returns in one forward pass (64x64, eval mode, no gradient), not from its attributes."""
        # timm's convention (timm/models/_builder.py): a model whose maps are NHWC says so in output_fmt
        if getattr(self.body, "output_fmt", "NCHW") != "NCHW":
            raise ValueError(f"timm model {self.model_name!r} keeps its maps NHWC between blocks, but an "
                             f"adapter path is a pair of NCHW convs; use a CNN, or tuning lora or spm")
        modules = dict(self.body.named_modules())
        outputs = self._probe({n: modules[n] for n in _block_names(self.body, self.model_name)})
        bad = [f"{n} -> {_shape(o)}" for n, o in outputs.items() if not (torch.is_tensor(o) and o.ndim == 4)]
        if bad or not outputs:
            raise ValueError(f"timm model {self.model_name!r} has no blocks that return one NCHW map "
                             f"({', '.join(bad[:4]) or 'none ran'}), so no adapter path can be added to them")
        return [(n, modules[n], int(o.shape[1])) for n, o in outputs.items()]

    @torch.no_grad()
    def _probe(self, blocks: dict[str, nn.Module]) -> dict[str, object]:
        """What each of ``blocks`` returns on a 64x64 input, in the order they run (blocks that do
        not run in ``forward`` are left out); every module's mode and the stage hook are restored."""
        outputs: dict[str, object] = {}
        handles = [m.register_forward_hook(partial(_record, outputs, n)) for n, m in blocks.items()]
        modes = [(m, m.training) for m in self.modules()]
        hook, self.stage_hook = self.stage_hook, None
        p = next(self.body.parameters())
        try:
            self.eval()
            self(torch.zeros(1, self.in_channels, 64, 64, device=p.device, dtype=p.dtype))
        finally:
            for h in handles:
                h.remove()
            for m, training in modes:
                m.training = training
            self.stage_hook = hook
        return outputs

    def load_pretrained(self, path: str | Path, name: str = "timm") -> None:
        """Load a timm-layout state dict (``.pth``/``.bin``/``.safetensors``), or an
        EfficientNet-PyTorch file (``_conv_stem``, ``_blocks.N``) through its key map; the
        classifier and other pruned parts are dropped, anything else must match exactly."""
        state = timm_state_dict(path, self.body, name, self.model_name)
        state = {k: v for k, v in state.items() if k not in self.dropped_keys}
        load_strict(self.body, state, path, name, target=f"timm model '{self.model_name}'",
                    hint=f"; give a weights file of timm's '{self.model_name}' built with the same model_args")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fresh weights from timm's own initialisation (Learn-from-Scratch), drawn from the global RNG."""
        fresh, _ = _pruned(self._create(), self._keep)
        self.body.load_state_dict(fresh.to(next(self.body.parameters()).device).state_dict())


def _record(outputs: dict[str, object], name: str, module: nn.Module, args: tuple, out: object) -> None:
    outputs.setdefault(name, out)


def _shape(out: object) -> str:
    return str(tuple(out.shape)) if torch.is_tensor(out) else type(out).__name__


def _block_names(body: nn.Module, model: str) -> list[str]:
    """The module names timm's ``group_matcher(coarse=False)`` matches in the ``blocks`` group: each
    parameter name goes to the first pattern that matches it (stem first, as timm groups them), and
    the matched prefix, where it names a module, is a block."""
    try:
        groups = body.group_matcher(coarse=False)
    except (AttributeError, NotImplementedError):  # a model that never declared its groups
        groups = {}
    if "blocks" not in groups:
        raise ValueError(f"timm model {model!r} declares no block groups (group_matcher), so the blocks "
                         f"an adapter path goes on are unknown; use tuning lora or spm")
    patterns = [(kind, re.compile(spec if isinstance(spec, str) else spec[0]))
                for kind, specs in groups.items() if specs is not None
                for spec in ([specs] if isinstance(specs, str) else specs)]
    modules = dict(body.named_modules())
    names: dict[str, None] = {}
    for pname, _ in body.named_parameters():
        for kind, pattern in patterns:
            m = pattern.match(pname)
            if m:
                if kind == "blocks" and m.group(0) in modules:
                    names[m.group(0)] = None
                break
    return list(names)


def _indices(out_indices: list[int] | None, n: int) -> tuple[int, ...]:
    idx = tuple(range(n)) if out_indices is None else tuple(i % n if -n <= i < n else i for i in out_indices)
    if not idx or any(not 0 <= i < n for i in idx) or list(idx) != sorted(set(idx)):
        raise ValueError(f"out_indices {list(out_indices or [])} must be increasing feature indices in 0..{n - 1}")
    return idx


def _pruned(body: nn.Module, keep: list[int]) -> tuple[nn.Module, frozenset[str]]:
    """The model without what ``forward_intermediates`` never runs (classifier, head conv; a ViT's
    final norm too, since its intermediates are taken unnormalised), and the state-dict keys that
    removed."""
    before = set(body.state_dict())
    body.prune_intermediate_layers(keep, prune_norm=isinstance(body, _token_classes()), prune_head=True)
    return body, frozenset(before - set(body.state_dict()))


def timm_state_dict(path: str | Path, body: nn.Module, name: str, model: str) -> dict[str, torch.Tensor]:
    """A local weights file in the key layout of ``body``'s unpruned timm model: timm's own files
    as they are (through the model family's ``checkpoint_filter_fn``, which e.g. resizes a ViT's
    position embedding), EfficientNet-PyTorch files through :func:`from_efficientnet_pytorch`."""
    state = read_state_dict(path, name, f"a state dict of timm's '{model}', .pth, .bin or .safetensors")
    if is_efficientnet_pytorch(state):
        return from_efficientnet_pytorch(state, body, path, model)
    import sys

    filter_fn = getattr(sys.modules[type(body).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, body)
        except Exception:  # a foreign file: the strict load below names its keys
            pass
    return state


# ------------------------------------------------------------------------------------------- ViTs


def _block_pre(owner: "TimmViT", index: int, block: nn.Module, args: tuple):
    x = args[0]
    slot = owner.slot_of_block.get(index)
    if slot is not None and owner.stage_hook is not None:
        x = owner.hooked_tokens(slot, x)
    if owner.prompt_tokens is not None:
        p = owner.prompt_tokens[index].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        n = owner.num_prefix_tokens
        x = torch.cat([x[:, :n], p, x[:, n:]], dim=1)
    return (x, *args[1:])


def _block_post(owner: "TimmViT", index: int, block: nn.Module, args: tuple, out: torch.Tensor):
    if owner.prompt_tokens is not None:
        n, k = owner.num_prefix_tokens, owner.prompt_tokens.shape[1]
        out = torch.cat([out[:, :n], out[:, n + k:]], dim=1)
    if index == owner.depth - 1 and owner.stage_hook is not None:
        out = owner.hooked_tokens(owner.num_stages, out)
    return out


def _adapter_in(block: nn.Module, norm: nn.Module, args: tuple) -> None:
    block.adapter_input = args[0] if block.adapter is not None else None


def _adapter_add(block: nn.Module, drop_path: nn.Module, args: tuple, out: torch.Tensor):
    if block.adapter is None:
        return out
    x, block.adapter_input = block.adapter_input, None
    return out + block.adapter(x)


class TimmViT(TokenBackbone):
    """A timm ViT (``VisionTransformer``, ``Eva``: DINOv2, EVA, DeiT, AugReg...) split into
    ``num_stages`` even stages (or at ``stage_starts``); built with ``dynamic_img_size`` so any
    input size works (the position embedding is resized per input, padding to whole patches).
    ``out_indices`` (block indices) default to each stage's last block; all ``depth`` blocks run
    (as in our own ViT), so the stages and VPT's prompts always cover the whole model."""

    def __init__(self, model: str, num_stages: int = 3, stage_starts: list[int] | None = None,
                 out_indices: list[int] | None = None, output_stride: int | None = None,
                 drop_path_rate: float = 0.0, model_args: dict[str, Any] | None = None, in_channels: int = 3):
        super().__init__()
        self.model_name = model
        args = {"dynamic_img_size": True, "dynamic_img_pad": True, **(model_args or {})}
        self._create = partial(create_body, model, None, in_channels, drop_path_rate, args)
        body = self._create()
        self.depth = len(body.blocks)
        self.embed_dim = int(body.embed_dim)
        patch = body.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        if output_stride not in (None, self.patch_size):
            raise ValueError(f"timm model {model!r} is a ViT with patch size {self.patch_size}: its output stride "
                             f"is {self.patch_size}, not {output_stride}; leave output_stride unset")
        if stage_starts is None:
            if num_stages < 1 or self.depth % num_stages:
                raise ValueError(f"num_stages={num_stages} must divide the {self.depth} blocks evenly")
            stage_starts = [i * (self.depth // num_stages) for i in range(num_stages)]
        starts = list(stage_starts)
        if not starts or starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= self.depth:
            raise ValueError(f"stage_starts={starts} must be increasing block indices in 0..{self.depth - 1} from 0")
        self.num_stages = len(starts)
        self.stage_starts = tuple(starts)
        self.slot_of_block = {b: i for i, b in enumerate(starts)}
        ends = [s - 1 for s in starts[1:]] + [self.depth - 1]
        self.out_indices = _indices(ends if out_indices is None else out_indices, self.depth)
        self.num_prefix_tokens = int(body.num_prefix_tokens)
        self._keep = list(range(self.depth))  # pruning blocks past the last out index would cut stages
        self.body, self.dropped_keys = _pruned(body, self._keep)
        if isinstance(body, _token_classes()[1]) and body.rope is not None:  # Eva's rotary embedding (EVA-02)
            self.prompt_refusal = (f"timm model {model!r} rotates its patch tokens by position (rope) and its "
                                   f"attention expects exactly H*W of them after the prefix tokens")
        self.slot_channels = [self.embed_dim] * (self.num_stages + 1)
        self.stage_hook: nn.Module | None = None
        self.register_parameter("prompt_tokens", None)
        self._grid = (0, 0)
        self._adapters = all(isinstance(b, _prenorm_blocks()) for b in self.body.blocks)
        for i, block in enumerate(self.body.blocks):
            block.register_forward_pre_hook(partial(_block_pre, self, i))
            block.register_forward_hook(partial(_block_post, self, i))
            if self._adapters:
                block.register_module("adapter", None)
                block.norm2.register_forward_pre_hook(partial(_adapter_in, block))
                block.drop_path2.register_forward_hook(partial(_adapter_add, block))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.body.blocks

    @property
    def feature_channels(self) -> list[int]:
        return [self.embed_dim] * len(self.out_indices)

    def adapter_blocks(self) -> list[nn.Module]:
        if not self._adapters:
            kinds = sorted({type(b).__name__ for b in self.body.blocks})
            raise ValueError(f"the blocks of timm model {self.model_name!r} ({', '.join(kinds)}) are not timm's "
                             f"pre-norm Block/EvaBlock, whose MLP branch (norm2, mlp, drop_path2) the adapter "
                             f"sits beside; use tuning vpt, lora or spm")
        return list(self.body.blocks)

    def hooked_tokens(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """``stage_hook(slot, grid)`` on the patch tokens of ``x`` (B, prefix + H*W, C)."""
        n = self.num_prefix_tokens
        h, w = self._grid
        grid = x[:, n:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        grid = self.stage_hook(slot, grid)
        return torch.cat([x[:, :n], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._grid = (math.ceil(x.shape[-2] / self.patch_size), math.ceil(x.shape[-1] / self.patch_size))
        return self.body.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)

    load_pretrained = TimmBackbone.load_pretrained
    reset_parameters = TimmBackbone.reset_parameters


def timm_backbone(model: str, output_stride: int | None = None, out_indices: list[int] | None = None,
                  num_stages: int = 3, stage_starts: list[int] | None = None, drop_path_rate: float = 0.0,
                  model_args: dict[str, Any] | None = None, in_channels: int = 3) -> TimmBackbone | TimmViT:
    """``model.backbone: {name: timm, model: NAME, ...}``: :class:`TimmViT` for timm's ViT families
    (``num_stages``/``stage_starts`` split their blocks), :class:`TimmBackbone` for the rest
    (``output_stride`` 8/16/32 where timm supports it)."""
    timm = _timm()
    if timm.is_model(model):
        from timm.models import (
            model_entrypoint,  # the family from the entry point's module, unbuilt
        )

        family = model_entrypoint(model).__module__.rsplit(".", 1)[-1]
        if family in ("vision_transformer", "eva"):
            return TimmViT(model, num_stages, stage_starts, out_indices, output_stride, drop_path_rate,
                           model_args, in_channels)
    if stage_starts is not None or num_stages != 3:
        raise ValueError(f"num_stages/stage_starts split a ViT's blocks; timm model {model!r} is staged by its "
                         f"feature_info, so leave them unset")
    return TimmBackbone(model, output_stride, out_indices, drop_path_rate, model_args, in_channels)
