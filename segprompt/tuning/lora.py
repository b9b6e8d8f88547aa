"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the backbone's
Conv2d and Linear layers, a modern parameter-efficient baseline beside the SPM paper's methods.

The backbone is frozen. Each selected layer W gets a trainable low-rank update, so it computes
``W x + (alpha / rank) · B(A(dropout(x)))``. The layers come from the ``peft`` library
(``LoraConfig`` + ``inject_adapter_in_model``), which wraps our own modules in place:

- **Linear** (in -> out): A is Linear in -> rank, B is Linear rank -> out, no biases:
  ``rank · (in + out)`` parameters.
- **Conv2d** (in -> out, k x k, as peft builds it): A is a k x k conv in -> rank with the layer's
  stride and padding, B is a 1x1 conv rank -> out, no biases: ``rank · (in · k² + out)`` parameters.

B starts at zero (A Kaiming-uniform), so the tuned model starts as exactly the frozen one. The
heads train as usual.

``target`` is a regular expression, matched with ``re.search`` against the backbone's module
names (``layer3.5.conv2``, ``blocks.7.attn.qkv``); by default every eligible layer gets LoRA:
on ResNet every stem, bottleneck and downsample conv, on our ViT (and timm's) the patch embedding
and every ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2``, on a timm EfficientNet or
MobileNet the stem, every pointwise conv (``conv_pw``, ``conv_pwl``) and the squeeze-excitation
convs where the variant has them (Lite has none). Not eligible are the ``out_proj`` of
``nn.MultiheadAttention`` (which reads its weight directly and would never call the LoRA path),
and:

- **Grouped and depthwise convs** (``conv_dw``; ConvNeXt's 7x7). peft 0.21 does wrap them, but
  only when ``rank`` is a multiple of ``groups`` (for a depthwise conv, of its channel count: 32 to
  1152 in EfficientNet-Lite0, so never at a low rank); its A is an *ungrouped* k x k conv C -> rank,
  so a depthwise layer of C·k² weights would get C²·k² + C new ones at rank C; and it cannot merge
  them ("Merging is not supported for _ConvNd layers with groups > 1"), which ``segprompt export``
  does. A target that matches them is told so (an error if it matches nothing else, else a log line).
- **Weight-standardising convs** (timm's ``StdConv2d`` family, in BiT and NFNets): peft builds A
  and B of the layer's own class, which would standardise them too, and a merged W + BA is then
  standardised as a whole, so the exported model would not be the trained one.

Placement and checkpoints: peft moves each wrapped layer's weight one level down, so
``backbone.layer1.0.conv1.weight`` reads ``backbone.layer1.0.conv1.base_layer.weight`` after
tuning, and the new tensors are ``...conv1.lora_A.default.weight`` / ``...lora_B.default.weight``.
Pretrained weights are loaded before the method runs, and trainable-only checkpoints hold just
the A/B matrices (and the heads), so a model rebuilt from the recipe and tuned again loads them.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from segprompt.tuning.base import TuningContext, TuningMethod, freeze

ADAPTER = "default"  # peft's adapter name; it appears in the parameter names
GROUPED_REASON = ("peft needs a rank that is a multiple of their groups, gives them an ungrouped k x k A, and "
                  "cannot merge them for export")

log = logging.getLogger(__name__)


def eligible_layers(backbone: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d (ungrouped, not weight-standardising) and Linear layer of ``backbone`` that LoRA
    can adapt, by name."""
    # here, not at the top: timm imports torchvision (seconds); peft, which LoRA runs on, does too
    from timm.layers import (
        ScaledStdConv2d,
        ScaledStdConv2dSame,
        StdConv2d,
        StdConv2dSame,
    )

    standardised = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)
    mha_out = {f"{n}.out_proj" if n else "out_proj" for n, m in backbone.named_modules()
               if isinstance(m, nn.MultiheadAttention)}
    out = {}
    for name, m in backbone.named_modules():
        conv = isinstance(m, nn.Conv2d) and m.groups == 1 and not isinstance(m, standardised)
        if conv or (isinstance(m, nn.Linear) and name not in mha_out):
            out[name] = m
    return out


def grouped_convs(backbone: nn.Module) -> list[str]:
    """The names of the grouped (depthwise included) Conv2d layers, which LoRA leaves out."""
    return [name for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]


class LoRA(TuningMethod):
    """Frozen backbone (BatchNorm statistics too, unless ``bn_eval: false``); LoRA matrices of rank
    ``rank``, scaled by ``alpha / rank``, on the layers ``target`` selects; the heads train."""

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, target: str = ".*",
                 bn_eval: bool = True):
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        try:
            self.pattern = re.compile(target)
        except re.error as e:
            raise ValueError(f"target {target!r} is not a regular expression ({e})") from None
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.target = target
        self.bn_eval = bn_eval

    def select(self, backbone: nn.Module) -> dict[str, nn.Module]:
        """The eligible layers whose names ``target`` matches; none is an error naming some."""
        layers = eligible_layers(backbone)
        chosen = {n: m for n, m in layers.items() if self.pattern.search(n)}
        grouped = [n for n in grouped_convs(backbone) if self.pattern.search(n)]
        if grouped and not chosen:
            raise ValueError(
                f"target {self.target!r} matches only grouped/depthwise convs ({', '.join(grouped[:3])}"
                f"{', ...' if len(grouped) > 3 else ''}), which LoRA leaves out: {GROUPED_REASON}; target the "
                f"convs around them (e.g. conv_pw)")
        if grouped:
            log.info("LoRA leaves %d grouped/depthwise convs unadapted (%s%s): %s", len(grouped),
                     ", ".join(grouped[:3]), ", ..." if len(grouped) > 3 else "", GROUPED_REASON)
        if not chosen:
            names = list(layers)
            shown = names if len(names) <= 8 else [*names[:6], "...", *names[-2:]]
            raise ValueError(
                f"target {self.target!r} matches no Conv2d or Linear layer of the backbone "
                f"({type(backbone).__name__}); it has {len(names)}, named like: {', '.join(shown) or 'none'}")
        return chosen

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        # imported here: peft pulls in transformers, which takes seconds to import
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora.layer import Conv2d as LoraConv2d

        backbone = model.backbone
        freeze(backbone, self.bn_eval)
        chosen = self.select(backbone)
        # peft matches a string target with re.fullmatch over module names: name the layers exactly
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                            target_modules="^(?:" + "|".join(re.escape(n) for n in chosen) + ")$")
        inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
        for m in backbone.modules():
            if isinstance(m, LoraConv2d):
                # peft gives A the layer's kernel, stride and padding but not its dilation; on a
                # dilated conv (ResNet-d8's stages 3 and 4) A's output would then be larger than the
                # layer's. A conv's dilation is read at every call, so setting it here is enough.
                for a in m.lora_A.values():
                    a.dilation = m.get_base_layer().dilation
