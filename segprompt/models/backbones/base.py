"""The interfaces a backbone declares, so tuning methods attach to any architecture the same way.

Every backbone is *staged* (SPM paper §3.1: "split the backbone into stages"): it has an
attribute ``stage_hook`` (``None`` until a method sets one) that it calls as ``hook(i, x)`` on the
NCHW input of stage ``i`` and once more as ``hook(len(slot_channels) - 1, x)`` on its last output;
``slot_channels`` lists the channels at those slots and ``feature_channels`` those of the features
``forward`` returns. Every backbone is a :class:`StagedBackbone`; :class:`TokenBackbone` adds
what VPT and AdaptFormer need of a ViT, :class:`BlockBackbone` what Adapter needs of a CNN other
than our ResNet.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


class StagedBackbone(nn.Module):
    """The contract above, and :meth:`load_pretrained`: read a local weights file into the backbone
    (the builder calls it for ``model.pretrained``)."""

    stage_hook: nn.Module | None
    slot_channels: list[int]
    feature_channels: list[int]

    def load_pretrained(self, path: str | Path, name: str) -> None:
        """Load ``path`` strictly: missing or unexpected keys and other shapes are an error that
        lists them (``name`` is the recipe's ``model.backbone.name``, for the messages). Backbones
        whose files use other key names override this to map them."""
        from segprompt.models.weights import load_strict, read_state_dict

        load_strict(self, read_state_dict(path, name, "its state dict"), path, name)


class TokenBackbone(StagedBackbone):
    """A ViT-like backbone: ``depth`` encoder blocks of width ``embed_dim`` over ``patch_size``
    patches, with VPT-deep's ``prompt_tokens`` slot (depth, n, C) (``None`` until set) and
    AdaptFormer's per-block ``adapter`` slot on the blocks :meth:`adapter_blocks` returns."""

    depth: int
    embed_dim: int
    patch_size: int
    prompt_refusal: str | None = None  # why VPT's prompts cannot enter this ViT's blocks; None: they can

    def adapter_blocks(self) -> list[nn.Module]:
        """The blocks whose ``adapter`` module (``None`` until set) is added to their MLP branch."""
        raise NotImplementedError


class BlockBackbone(StagedBackbone):
    """A CNN that names its blocks, so Adapter (:mod:`segprompt.tuning.side`) can add its path to
    each block's output without knowing the block classes."""

    def conv_blocks(self) -> list[tuple[str, nn.Module, int]]:
        """``(name, block, C_out)`` in forward order; each block returns one NCHW tensor of C_out channels."""
        raise NotImplementedError
