"""Side-Tuning (Zhang et al. [55]) and Adapter (Houlsby et al. [25]) on ResNet residual blocks, as
the SPM paper's baselines (Tables 1-3; ``docs/spm.md``, "Baselines"); Adapter also on the blocks of
a timm CNN (:meth:`~segprompt.models.backbones.base.BlockBackbone.conv_blocks`).

Each residual block of the frozen backbone gets a small path: a 3x3 conv C_in -> ``channels``
(``groups`` groups, bias), a ReLU, and a 1x1 conv ``channels`` -> C_out (bias).

- **Side-Tuning** feeds the path the block's *input* and adds the result to the block's output.
  The 3x3 conv uses the block's stride and dilation, so both branches have the same shape.
- **Adapter** applies the path to the block's *output* (C_in = C_out, stride 1) and adds it back
  residually.

Both give per block 9·C_in·channels/groups + channels + (channels + 1)·C_out parameters. At
ResNet-101 (33 bottlenecks) that is 6,511,424 for Side-Tuning and 6,797,120 for Adapter. The
ReLU between the convs costs nothing. There is no normalisation, since it would add parameters,
and no activation after the sum, as in both original methods.

The last conv starts at zero, weight and bias. The tuned model therefore starts as exactly the
pretrained one, and the first conv learns from the second step on.

**timm CNNs.** A block is what timm itself groups as one (``blocks.S.J`` in EfficientNet,
``layerS.J`` in its ResNets; see ``TimmBackbone.conv_blocks``), whether or not it has a skip
connection, and C_out is what the block returns. Side-Tuning is refused there: its path must
repeat the block's stride and dilation from the block's input, and timm's block kinds keep those
in differently named layers (``conv_dw``, ``conv2``, a separate downsample), so they cannot be
read the same way for every block.

**Placement.** The path is registered as a child of its block (``side`` or ``adapter``) and added
by a forward hook on the block. The block classes and the backbone's parameter names do not
change: ``backbone.layer1.0.conv1.weight`` stays as in the pretrained file, and the new
parameters read ``backbone.layer1.0.side.down.weight``. Trainable-only checkpoints hold just
these, and full checkpoints line up with the other methods'. The hooks are module-level
functions that find the path through the block, so ``deepcopy`` and pickling keep them. A model
rebuilt from a recipe gets them back when the method is applied again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.models.backbones.base import BlockBackbone
from segprompt.models.backbones.resnet import BasicBlock, Bottleneck
from segprompt.tuning.base import TuningContext, TuningMethod, freeze


class SidePath(nn.Module):
    """3x3 grouped conv (stride, dilation) -> ReLU -> 1x1 conv, the last conv zero-initialised."""

    def __init__(self, in_channels: int, out_channels: int, channels: int, groups: int,
                 stride: int = 1, dilation: int = 1):
        super().__init__()
        self.down = nn.Conv2d(in_channels, channels, 3, stride, dilation, dilation, groups=groups)
        self.up = nn.Conv2d(channels, out_channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(x)))


def _add_side(block: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + block.side(args[0])


def _add_adapter(block: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + block.adapter(out)


def _residual_blocks(backbone: nn.Module, method: str) -> list[BasicBlock | Bottleneck]:
    if isinstance(backbone, BlockBackbone) and method == "side":
        raise SegpromptError("tuning 'side' cannot shape its path from a timm block's input (timm's block kinds "
                             "keep their stride and dilation in differently named layers); use tuning 'adapter', "
                             "which reads only the block's output, or model.backbone.name: resnet")
    blocks = [b for stage in getattr(backbone, "stages", []) for b in stage]
    if not blocks or not all(isinstance(b, (BasicBlock, Bottleneck)) for b in blocks):
        also = ", or timm with a CNN" if method == "adapter" else ""
        raise SegpromptError(f"tuning '{method}' inserts paths into ResNet residual blocks, but backbone "
                             f"'{type(backbone).__name__}' has none; use model.backbone.name: resnet{also}")
    return blocks


def _geometry(block: BasicBlock | Bottleneck) -> tuple[int, int, int, int]:
    """(C_in, C_out, stride, dilation) of a block; the last two are those of its strided 3x3 conv."""
    if isinstance(block, Bottleneck):
        strided, last = block.conv2, block.conv3
    else:
        strided, last = block.conv1, block.conv2
    return block.conv1.in_channels, last.out_channels, strided.stride[0], strided.dilation[0]


class SideTuning(TuningMethod):
    """Frozen backbone (BatchNorm statistics too, unless ``bn_eval: false``); a side path from each
    residual block's input to its output trains with the heads."""

    name = "side"

    def __init__(self, channels: int = 64, groups: int = 4, bn_eval: bool = True):
        if channels % groups:
            raise ValueError(f"groups={groups} must divide channels={channels}")
        self.channels = channels
        self.groups = groups
        self.bn_eval = bn_eval

    def _path(self, cin: int, cout: int, stride: int, dilation: int) -> SidePath:
        if cin % self.groups:
            raise ValueError(f"groups={self.groups} must divide every path input; a block has "
                                 f"{cin} channels")
        return SidePath(cin, cout, self.channels, self.groups, stride, dilation)

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        blocks = _residual_blocks(model.backbone, self.name)
        freeze(model.backbone, self.bn_eval)
        for block in blocks:
            cin, cout, stride, dilation = _geometry(block)
            block.add_module("side", self._path(cin, cout, stride, dilation))
            block.register_forward_hook(_add_side)


class Adapter(SideTuning):
    """Frozen backbone; an adapter on each residual block's output (each block of a timm CNN),
    added back residually."""

    name = "adapter"

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        backbone = model.backbone
        if isinstance(backbone, BlockBackbone):
            blocks = [(block, cout) for _, block, cout in backbone.conv_blocks()]
        else:
            blocks = [(block, _geometry(block)[1]) for block in _residual_blocks(backbone, self.name)]
        freeze(backbone, self.bn_eval)
        for block, cout in blocks:
            block.add_module("adapter", self._path(cout, cout, 1, 1))
            block.register_forward_hook(_add_adapter)
