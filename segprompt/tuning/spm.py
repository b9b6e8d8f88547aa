"""Stage-wise Prompt-Matched tuning (SPM paper, Section 3, Fig. 1, Eq. 1 and 5).

The backbone is frozen; an :class:`~segprompt.models.spm.SPM` is inserted before each chosen stage
(slot ``i`` = the input of stage ``i``, 1-based as in the paper; slot ``num_stages + 1`` = the
backbone output, before the head). The semantic map flows from SPM to SPM, starting from ``M0``,
the per-pixel class prior of the training split. Each SPM's interim maps add the loss
``a_i / R * CE(M_i^r, label)`` for every iteration ``r`` (Eq. 5, a = 0.05, 0.1, 0.2, 0.3, 0.4).

On an image classifier (the recognition appendix) the SPMs are :class:`~segprompt.models.spm.SPMVector`:
the map becomes a category probability vector, starting from the class frequencies of the
training split (P0), and the interim losses are plain cross-entropy on the interim vectors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segprompt.models.spm import SPM, SPMVector
from segprompt.tuning.base import TuningContext, TuningMethod, freeze

INTERIM_WEIGHTS = (0.05, 0.1, 0.2, 0.3, 0.4)


class SPMChain(nn.Module):
    """The backbone's ``stage_hook``: applies the SPM of each prompted slot and keeps the map."""

    def __init__(self, spms: dict[int, SPM], prior: torch.Tensor, weights: dict[int, float], loss_fn: nn.Module,
                 align_corners: bool = False):
        super().__init__()
        self.spms = nn.ModuleDict({str(k): v for k, v in spms.items()})
        self.register_buffer("prior", prior)  # M0: (K, r, r)
        self.weights = weights
        self.loss_fn = loss_fn
        self.align_corners = align_corners
        self._map: torch.Tensor | None = None
        self._interim: list[tuple[int, list[torch.Tensor]]] = []

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            self._map, self._interim = None, []
        spm = self.spms[str(index + 1)] if str(index + 1) in self.spms else None
        if spm is None:
            return x
        if self._map is not None:
            smap = self._map
        else:  # M0 (K, r, r), or P0 (K,) for recognition
            smap = self.prior.unsqueeze(0).expand(x.shape[0], *self.prior.shape)
        x, self._map, interim = spm(x, smap)
        if self.training:
            self._interim.append((index + 1, interim))
        return x

    def _resize(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if logits.ndim == 2:  # an interim category vector
            return logits
        return F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def losses(self, label: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for slot, maps in self._interim:
            weight = self.weights[slot] / len(maps)
            if weight == 0:
                continue
            total = sum(self.loss_fn(self._resize(m, label), label) for m in maps)
            out[f"loss_spm{slot}"] = weight * total
        self._interim = []
        return out


class SPMTuning(TuningMethod):
    """Freeze the backbone and insert SPMs at ``stages`` (1-based slots).

    ``interim_weights`` are the a_i of Eq. 5 per slot; ``semantic_learning=False`` sets them all to
    0 (Table 6, "w/o SPL"); ``long_range=False`` makes every PDC dilation 1 ("w/o LSCM").
    ``prior_resolution`` is the side of the stored M0 grid. Other options configure each SPM.
    """

    def __init__(self, stages: list[int] = (1, 2, 3, 4), recurrent: int = 1, channels: int = 256,
                 map_in_groups: int = 2, prompt_in_groups: int = 1, in_mode: str = "concat",
                 map_out_groups: int = 2, prompt_out_groups: int = 32,
                 dilations: tuple[int, int, int, int] = (1, 2, 4, 8), pdc_groups: int = 4,
                 pdc_fuse_groups: int = 4, pdc_split: bool = True, bias: bool = True,
                 interim_weights: list[float] = INTERIM_WEIGHTS, semantic_learning: bool = True,
                 long_range: bool = True, prior_resolution: int = 64, bn_eval: bool = True):
        self.stages = sorted(set(stages))
        self.spm_kwargs = dict(channels=channels, recurrent=recurrent, map_in_groups=map_in_groups,
                               prompt_in_groups=prompt_in_groups, in_mode=in_mode, map_out_groups=map_out_groups,
                               prompt_out_groups=prompt_out_groups,
                               dilations=tuple(dilations) if long_range else (1, 1, 1, 1),
                               pdc_groups=pdc_groups, pdc_fuse_groups=pdc_fuse_groups, pdc_split=pdc_split, bias=bias)
        self.interim_weights = list(interim_weights) if semantic_learning else [0.0] * len(interim_weights)
        self.prior_resolution = prior_resolution
        self.bn_eval = bn_eval

    def apply(self, model: nn.Module, ctx: TuningContext) -> None:
        backbone = model.backbone
        slots = backbone.slot_channels
        bad = [s for s in self.stages if not 1 <= s <= len(slots)]
        if bad:
            raise ValueError(f"SPM stages {bad} do not exist: this backbone has slots 1..{len(slots)} "
                             f"({len(slots) - 1} stages, then the head)")
        if len(self.interim_weights) < max(self.stages):
            raise ValueError(f"interim_weights has {len(self.interim_weights)} entries; slot {max(self.stages)} needs one")
        freeze(backbone, self.bn_eval)
        k = ctx.num_classes
        recognition = getattr(model, "task", "segmentation") == "recognition"
        prior = self._prior(ctx, backbone, 1 if recognition else self.prior_resolution)
        if recognition:
            prior = prior.reshape(k)
        spm_cls = SPMVector if recognition else SPM
        spms = {s: spm_cls(slots[s - 1], k, **self.spm_kwargs) for s in self.stages}
        weights = {s: self.interim_weights[s - 1] for s in self.stages}
        chain = SPMChain(spms, prior, weights, model.decode_head.loss_fn, model.align_corners)
        backbone.stage_hook = chain
        model.loss_providers.append(chain)

    def _prior(self, ctx: TuningContext, backbone: nn.Module, r: int) -> torch.Tensor:
        k = ctx.num_classes
        device = next(backbone.parameters()).device
        if device.type == "meta" or ctx.class_prior is None:
            return torch.full((k, r, r), 1.0 / k, device=device)
        prior = np.array(ctx.class_prior(r), dtype=np.float32)
        if prior.shape != (k, r, r):
            raise ValueError(f"class prior has shape {prior.shape}, expected {(k, r, r)}")
        return torch.from_numpy(prior)
