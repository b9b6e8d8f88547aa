"""VPT-deep (Jia et al., "Visual Prompt Tuning", ECCV 2022, §3.2 "VPT-Deep"), and VPT + Bias-Tuning.

The ViT backbone is frozen. Every layer gets ``num_tokens`` learnable prompt tokens inserted after
the cls token; the layer's prompt outputs are dropped, and the next layer gets its own prompts
(the backbone's ``prompt_tokens`` slot, see :mod:`segprompt.models.backbones.vit`; a ViT that
cannot take them says why in its ``prompt_refusal``, e.g. a timm rope model). The prompts
start uniform in ±sqrt(6 / (3·patch² + C)) (Xavier-uniform over the patch projection, as in VPT).
ViT-L with 10 tokens: 24 x 10 x 1024 = 245,760 parameters (SPM paper Table 8).

``bias: true`` also trains every backbone bias (VPT+Bias-Tuning, run with 100 tokens in the SPM
paper's Table 8: 2,457,600 prompt parameters + 271,360 biases). The heads train as usual.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.tuning.base import TuningContext, TuningMethod, freeze, vit_backbone


class VPT(TuningMethod):
    def __init__(self, num_tokens: int = 10, bias: bool = False):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.bias = bias

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        vit = vit_backbone(model, "vpt", "prompts the layers of a ViT")
        if vit.prompt_refusal:
            raise SegpromptError(f"tuning 'vpt' cannot insert prompt tokens: {vit.prompt_refusal}; use tuning "
                                 f"adaptformer, lora or spm")
        freeze(vit)
        if self.bias:
            for name, p in vit.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias":
                    p.requires_grad_(True)
        prompts = torch.empty(vit.depth, self.num_tokens, vit.embed_dim, device=next(vit.parameters()).device)
        val = math.sqrt(6.0 / (3 * vit.patch_size**2 + vit.embed_dim))
        vit.prompt_tokens = nn.Parameter(nn.init.uniform_(prompts, -val, val))
