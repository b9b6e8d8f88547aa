"""Semantic-aware Prompt Matcher (SPM) and Pyramid Dilation Convolution (PDC).

Liu et al., "Prompt-Matched Semantic Segmentation", Section 3.2, Figures 2-3, Eq. 2-4. One SPM
sits before a stage of a frozen backbone and runs ``R`` recurrent iterations with shared weights;
each iteration

* refines the interim semantic map (Eq. 3): ``M = softmax(Out_b(PDC_a(In_a(F ⊕ M))))``;
* generates the prompt (Eq. 4): ``W = Out_d(PDC_c(In_c(F ⊕ M))); F = F + F ⊗ W``.

The paper leaves the grouping of every conv and the dilation rates open, and no single fixed
design reproduces its ResNet parameter column (``docs/spm.md``, "Why the ResNet Prompt column is not
reproduced"). Every choice is therefore an argument; the defaults are design "D2" (``docs/spm.md``,
"What one SPM costs"), which matches the ViT-L Table 7 counts exactly (587,414 parameters at
Cf=1024, K=150):

* ``In_a``: 1x1 conv on the concatenation, 2 groups; ``In_c``: dense; both to ``C = 256``;
* ``Out_b``: C -> K, 2 groups; ``Out_d``: C -> Cf, 32 groups;
* each PDC splits its input into 4 parts, 3x3 dilated convs with 4 groups, then a 1x1 fuse with
  4 groups; dilations (1, 2, 4, 8) (the "no long-range context" ablation uses (1, 1, 1, 1)).

Groups that do not divide a layer's channels are reduced to the largest divisor that does, and a
concatenation (or class count) that does not split into the groups is zero-padded, so any
backbone width and class count work; for the paper's shapes nothing is reduced or padded.
``Out_d`` starts at zero, so an untrained SPM passes features through unchanged (the frozen
backbone first sees exactly its pretrained input); ReLUs sit between the convs (no parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_WIDTH = 256  # the paper's C, at which the group numbers are given


def scaled_groups(groups: int, channels: int) -> int:
    """A group number given at C = 256, scaled to width ``channels`` so that every group keeps the
    paper's channels per group (at least one group): 32 groups at C = 256 are 4 at C = 32."""
    return max(1, round(groups * channels / REFERENCE_WIDTH))


def auto_channels(slot_channels: list[int] | tuple[int, ...]) -> int:
    """``tuning.channels: auto``, the SPM width C for a backbone with these slot widths
    (docs/spm.md, "C follows the backbone"): half the median slot width, rounded to the nearest
    multiple of 8 (halves up), at least 8 and at most the paper's 256. ResNet-101 (64/256/512/1024/2048):
    256, the paper's C; ViT-L (1024 at every slot): 256 (capped); a ResNet-18 at width 12
    (12/12/24/48/96): 16; EfficientNet-Lite0 (16/24/40/112/320): 24."""
    if not slot_channels or any(c < 1 for c in slot_channels):
        raise ValueError(f"auto SPM width needs the backbone's slot widths, got {list(slot_channels)}")
    widths = sorted(slot_channels)
    n = len(widths)
    median = widths[n // 2] if n % 2 else (widths[n // 2 - 1] + widths[n // 2]) / 2
    return min(REFERENCE_WIDTH, max(8, 8 * int(median / 16 + 0.5)))


def channel_rms_norm(feat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """F divided per pixel by its root mean square over channels: no parameters. ``feat_norm``
    feeds it to the branches, so the concatenated map M (probabilities in [0, 1]) is not drowned by
    F's scale (docs/spm.md, "Normalising F at the branch inputs"); the update F + F·W keeps raw F."""
    return feat * torch.rsqrt(feat.float().pow(2).mean(dim=1, keepdim=True).add(eps)).to(feat.dtype)


def _groups(groups: int, *channels: int) -> int:
    g = groups
    while any(c % g for c in channels):
        g -= 1
    return g


class PaddedGroupConv1x1(nn.Module):
    """1x1 grouped conv whose input and output are zero-padded to multiples of ``groups``
    (the padded output channels are dropped)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups = max(groups, 1)
        g = self.groups
        self.in_pad = -in_channels % g
        out_padded = out_channels + (-out_channels % g)
        self.conv = nn.Conv2d(in_channels + self.in_pad, out_padded, 1, groups=g, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.in_pad))
        y = self.conv(x)
        return y[:, : self.out_channels] if y.shape[1] != self.out_channels else y


class InputConv(nn.Module):
    """``Conv1x1(F ⊕ M) -> C``: ``mode='concat'`` groups the concatenation; ``mode='split'``
    groups F and maps M densely to every group (the two readings in ``docs/spm.md``, "What one SPM costs")."""

    def __init__(self, feat_channels: int, num_classes: int, channels: int, groups: int, mode: str = "concat",
                 bias: bool = True):
        super().__init__()
        if mode not in ("concat", "split"):
            raise ValueError(f"SPM input-conv mode must be 'concat' or 'split', got {mode!r}")
        self.mode = mode
        if mode == "concat":
            self.conv = PaddedGroupConv1x1(feat_channels + num_classes, channels,
                                           _groups(groups, channels), bias)
        else:
            self.conv_f = nn.Conv2d(feat_channels, channels, 1, groups=_groups(groups, feat_channels, channels),
                                    bias=bias)
            self.conv_m = nn.Conv2d(num_classes, channels, 1, bias=False)

    def forward(self, feat: torch.Tensor, smap: torch.Tensor) -> torch.Tensor:
        if self.mode == "concat":
            return self.conv(torch.cat([feat, smap], dim=1))
        return self.conv_f(feat) + self.conv_m(smap)


class PDC(nn.Module):
    """Pyramid Dilation Convolution (Fig. 3): four dilated 3x3 group convs, concatenated, 1x1 fuse.

    ``split=True``: the input is divided into four channel parts, one per branch (the text);
    ``split=False``: every branch sees the whole input. Each branch outputs C/4 channels."""

    def __init__(self, channels: int, dilations: tuple[int, int, int, int] = (1, 2, 4, 8), groups: int = 4,
                 fuse_groups: int = 4, split: bool = True, bias: bool = True):
        super().__init__()
        if channels % 4:
            raise ValueError(f"PDC channels must be divisible by 4, got {channels}")
        if len(dilations) != 4:
            raise ValueError(f"PDC has four branches; got dilations {dilations}")
        q = channels // 4
        cin = q if split else channels
        self.split = split
        self.branches = nn.ModuleList(
            nn.Conv2d(cin, q, 3, padding=d, dilation=d, groups=_groups(groups, cin, q), bias=bias) for d in dilations)
        self.fuse = nn.Conv2d(channels, channels, 1, groups=_groups(fuse_groups, channels), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.chunk(4, dim=1) if self.split else [x] * 4
        y = torch.cat([b(p) for b, p in zip(self.branches, parts)], dim=1)
        return self.fuse(F.relu(y))


class SPM(nn.Module):
    """One Semantic-aware Prompt Matcher for a slot with ``in_channels`` (Cf) features.

    ``forward(feat, smap)`` takes the stage input F and the previous semantic map M (class
    probabilities at any resolution; resized here) and returns the prompted feature, the refined
    map, and the logits of the refined map at every iteration (for the interim losses, Eq. 5).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, recurrent: int = 1,
                 map_in_groups: int = 2, prompt_in_groups: int = 1, in_mode: str = "concat",
                 map_out_groups: int = 2, prompt_out_groups: int = 32,
                 dilations: tuple[int, int, int, int] = (1, 2, 4, 8), pdc_groups: int = 4,
                 pdc_fuse_groups: int = 4, pdc_split: bool = True, bias: bool = True,
                 scale_groups: bool = True, feat_norm: bool = False):
        super().__init__()
        self.feat_norm = feat_norm
        if recurrent < 1:
            raise ValueError(f"SPM needs at least one recurrent iteration, got {recurrent}")
        if channels < 4 or channels % 4:
            raise ValueError(f"SPM channels (C) must be a positive multiple of 4 (the PDC has four branches), "
                             f"got {channels}")
        if scale_groups:  # group numbers are given at the paper's C = 256 (docs/spm.md, "Groups scale with C")
            map_in_groups, prompt_in_groups, map_out_groups, prompt_out_groups, pdc_groups, pdc_fuse_groups = (
                scaled_groups(g, channels) for g in (map_in_groups, prompt_in_groups, map_out_groups,
                                                     prompt_out_groups, pdc_groups, pdc_fuse_groups))
        self.recurrent = recurrent
        self.num_classes = num_classes
        self.prompt_ratio: torch.Tensor | None = None  # ||F_out - F_in|| / ||F_in|| of the last forward
        self.map_in = InputConv(in_channels, num_classes, channels, map_in_groups, in_mode, bias)
        self.map_pdc = PDC(channels, dilations, pdc_groups, pdc_fuse_groups, pdc_split, bias)
        self.map_out = PaddedGroupConv1x1(channels, num_classes, _groups(map_out_groups, channels), bias)
        self.prompt_in = InputConv(in_channels, num_classes, channels, prompt_in_groups, in_mode, bias)
        self.prompt_pdc = PDC(channels, dilations, pdc_groups, pdc_fuse_groups, pdc_split, bias)
        self.prompt_out = nn.Conv2d(channels, in_channels, 1, groups=_groups(prompt_out_groups, channels, in_channels),
                                    bias=bias)
        nn.init.zeros_(self.prompt_out.weight)
        if bias:
            nn.init.zeros_(self.prompt_out.bias)

    def forward(self, feat: torch.Tensor, smap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        if smap.shape[-2:] != feat.shape[-2:]:
            smap = F.interpolate(smap, size=feat.shape[-2:], mode="bilinear", align_corners=False)
        smap = smap.to(feat.dtype)
        feat_in = feat
        interim: list[torch.Tensor] = []
        for _ in range(self.recurrent):  # theta shared over iterations (Eq. 2)
            branch = channel_rms_norm(feat) if self.feat_norm else feat
            logits = self.map_out(F.relu(self.map_pdc(F.relu(self.map_in(branch, smap)))))
            smap = logits.softmax(dim=1)
            interim.append(logits)
            weight = self.prompt_out(F.relu(self.prompt_pdc(F.relu(self.prompt_in(branch, smap)))))
            feat = feat + feat * weight
        self._track(feat_in, feat)
        return feat, smap, interim

    @torch.no_grad()
    def _track(self, feat_in: torch.Tensor, feat_out: torch.Tensor) -> None:
        self.prompt_ratio = (feat_out - feat_in).float().norm() / feat_in.float().norm().clamp_min(1e-12)

    def branch_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The parameters of the prompt branch (In_c, PDC_c, Out_d) and the map branch (In_a, PDC_a, Out_b)."""
        return {"prompt": [*self.prompt_in.parameters(), *self.prompt_pdc.parameters(), *self.prompt_out.parameters()],
                "map": [*self.map_in.parameters(), *self.map_pdc.parameters(), *self.map_out.parameters()]}


class SPMVector(SPM):
    """The SPM of the recognition appendix (Fig. 6): the interim semantic map becomes an interim
    category probability vector V (B, K). V is expanded to the feature's resolution before each
    concatenation; the refinement branch ends in global max pooling and a fully connected layer,
    ``V = softmax(FC(GMP(PDC_a(In_a(F ⊕ V)))))``; the prompt branch is the segmentation SPM's."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 96, **kwargs):
        super().__init__(in_channels, num_classes, channels, **kwargs)
        self.map_out = nn.Linear(channels, num_classes, bias=kwargs.get("bias", True))

    def forward(self, feat: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        vec = vec.to(feat.dtype)
        feat_in = feat
        interim: list[torch.Tensor] = []
        for _ in range(self.recurrent):  # theta shared over iterations (Eq. 2)
            expanded = vec[:, :, None, None].expand(-1, -1, *feat.shape[-2:])
            pooled = F.adaptive_max_pool2d(F.relu(self.map_pdc(F.relu(self.map_in(feat, expanded)))), 1)
            logits = self.map_out(pooled.flatten(1))
            vec = logits.softmax(dim=1)
            interim.append(logits)
            expanded = vec[:, :, None, None].expand(-1, -1, *feat.shape[-2:])
            weight = self.prompt_out(F.relu(self.prompt_pdc(F.relu(self.prompt_in(feat, expanded)))))
            feat = feat + feat * weight
        self._track(feat_in, feat)
        return feat, vec, interim


def spm_param_count(in_channels: int, num_classes: int, **kwargs) -> int:
    """Parameters of one SPM (no buffers, no norms), counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in SPM(in_channels, num_classes, **kwargs).parameters())


__all__ = ["SPM", "SPMVector", "PDC", "auto_channels", "spm_param_count"]
