"""AdaptFormer (Chen et al., NeurIPS 2022, §3.2 "AdaptMLP"): a bottleneck beside each MLP of a frozen ViT.

Each block gets ``x + drop_path(MLP(LN(x))) + s · up(dropout(ReLU(down(x))))``, where ``x`` is the
MLP branch's input (before its LayerNorm), ``down`` is Linear C -> ``bottleneck`` and ``up`` is
Linear ``bottleneck`` -> C, both with bias, and ``s`` is a fixed scale (0.1 in AdaptFormer). ``up``
starts at zero, so the tuned model starts as the pretrained one. ViT-L with bottleneck 64:
24 x (1024·64 + 64 + 64·1024 + 1024) = 24 x 132,160 = 3,171,840 parameters (SPM paper Table 8).
"""

from __future__ import annotations

import torch
from torch import nn

from segprompt.tuning.base import TuningContext, TuningMethod, freeze, vit_backbone


class AdaptMLP(nn.Module):
    """The bottleneck branch; its output is added to the block's MLP branch."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down_proj = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(self.dropout(self.act(self.down_proj(x)))) * self.scale


class AdaptFormer(TuningMethod):
    def __init__(self, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        self.bottleneck = bottleneck
        self.scale = scale
        self.dropout = dropout

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        vit = vit_backbone(model, "adaptformer", "adds a branch to the MLPs of a ViT")
        freeze(vit)
        device = next(vit.parameters()).device
        for block in vit.adapter_blocks():
            block.adapter = AdaptMLP(vit.embed_dim, self.bottleneck, self.scale, self.dropout).to(device)
