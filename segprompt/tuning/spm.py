"""Stage-wise Prompt-Matched tuning (SPM paper, Section 3, Fig. 1, Eq. 1 and 5).

The backbone is frozen; an :class:`~segprompt.tuning.spm_layers.SPM` is inserted before each chosen stage
(slot ``i`` = the input of stage ``i``, 1-based as in the paper; slot ``num_stages + 1`` = the
backbone output, before the head). The semantic map flows from SPM to SPM, starting from ``M0``,
the per-pixel class prior of the training split. Each SPM's interim maps add the loss
``a_i / R * CE(M_i^r, label)`` for every iteration ``r`` (Eq. 5, a = 0.05, 0.1, 0.2, 0.3, 0.4).

On an image classifier (the recognition appendix) the SPMs are :class:`~segprompt.tuning.spm_layers.SPMVector`:
the map becomes a category probability vector, starting from the class frequencies of the
training split (P0), and the interim losses are plain cross-entropy on the interim vectors.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segprompt.data.view import is_identity, view_theta
from segprompt.models.inserted import Inserted
from segprompt.tuning.base import TuningContext, TuningMethod, freeze, oversize_warning
from segprompt.tuning.spm_layers import SPM, SPMVector, auto_channels

INTERIM_WEIGHTS = (0.05, 0.1, 0.2, 0.3, 0.4)

log = logging.getLogger(__name__)


class SPMChain(Inserted):
    """The backbone's ``stage_hook``: applies the SPM of each prompted slot and keeps the map.

    M0 follows the image (docs/spm.md, "M0 follows the image"): ``prior`` (K, r, r) covers the whole
    original image, while the input may be a training crop (resized, flipped, padded), a sliding
    window or a flipped TTA pass. The segmentor calls :meth:`set_view` with the input's view
    (B, 5) = ``(y0, x0, y1, x1, flipped)``, the box of the original image the input covers in
    normalised coordinates (:mod:`segprompt.data.view`). The first SPM then gets, per sample, M0
    resampled at its feature size (h, w): output pixel ``u`` in [-1, 1] (align_corners=False
    centres) reads M0 at ``g_x = ±(x1 - x0) u_x + (x0 + x1 - 1)`` (minus when flipped),
    ``g_y = (y1 - y0) u_y + (y0 + y1 - 1)`` with ``F.affine_grid``/``F.grid_sample`` (bilinear,
    border padding: the part of a box past the image repeats M0's edge). With no view, or the
    identity view (0, 0, 1, 1, 0), M0 goes to the first SPM unchanged, exactly as before (the SPM
    resizes it); in a mixed batch the identity rows get that same resize. The vector P0 of
    recognition has no geometry and ignores the view.
    """

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
        self._view: torch.Tensor | None = None  # (B, 5) view of the current input; None = identity
        # evaluation diagnostics: while capturing, each eval forward keeps every slot's final map
        self.capturing = False

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            self._map, self._interim = None, []
        spm = self.spms[str(index + 1)] if str(index + 1) in self.spms else None
        if spm is None:
            return x
        if self._map is not None:
            smap = self._map
        else:  # M0 (K, r, r), or P0 (K,) for recognition
            smap = self.initial_map(x)
        x, self._map, interim = spm(x, smap)
        if self.training:
            self._interim.append((index + 1, interim))
        elif self.capturing:
            self.captured[index + 1] = self._map.detach()
        return x

    def capture(self, on: bool) -> None:
        self.capturing, self.captured = on, {}

    def set_view(self, view: torch.Tensor | None) -> None:
        """The view (B, 5) or (5,) of the next input, or ``None`` (the whole image as it is)."""
        if view is not None and (view.ndim not in (1, 2) or view.shape[-1] != 5):
            raise ValueError(f"a view is (B, 5) = (y0, x0, y1, x1, flipped) per input, got shape {tuple(view.shape)}")
        self._view = view

    def initial_map(self, x: torch.Tensor) -> torch.Tensor:
        """M0 for the input whose first prompted feature is ``x``: (B, K, r, r) as stored for the
        identity view (or no view), else resampled to the view at ``x``'s size (class docstring)."""
        b, prior = x.shape[0], self.prior
        plain = prior.unsqueeze(0).expand(b, *prior.shape)
        if self._view is None or prior.ndim != 3:
            return plain
        view = self._view.to(device=prior.device, dtype=prior.dtype).reshape(-1, 5)
        if view.shape[0] not in (1, b):
            raise ValueError(f"the view has {view.shape[0]} rows for a batch of {b}")
        view = view.expand(b, 5)
        same = is_identity(view)
        if bool(same.all()):
            return plain
        size = tuple(x.shape[-2:])
        grid = F.affine_grid(view_theta(view), [b, prior.shape[0], *size], align_corners=False)
        m0 = F.grid_sample(plain.contiguous(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        if bool(same.any()):  # identity rows: what the SPM's own resize makes of the stored M0
            old = plain if tuple(prior.shape[-2:]) == size else F.interpolate(
                plain, size=size, mode="bilinear", align_corners=False)
            m0 = torch.where(same[:, None, None, None], old, m0)
        return m0

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

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Per slot, from the last training forward/backward (docs/spm.md, "Diagnostics"):
        ``spm{i}_prompt_ratio`` = ||F_out - F_in|| / ||F_in||, how much the prompts changed the
        stage input; ``spm{i}_grad_prompt`` / ``spm{i}_grad_map`` = the L2 norm of the gradients
        reaching the prompt branch (In_c, PDC_c, Out_d) and the map branch (In_a, PDC_a, Out_b)."""
        out: dict[str, float] = {}
        for slot, spm in self.spms.items():
            if spm.prompt_ratio is not None:
                out[f"spm{slot}_prompt_ratio"] = float(spm.prompt_ratio)
            for branch, params in spm.branch_parameters().items():
                grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
                if grads:
                    out[f"spm{slot}_grad_{branch}"] = float(torch.stack(grads).norm())
        return out


class SPMTuning(TuningMethod):
    """Freeze the backbone and insert SPMs at ``stages`` (1-based slots).

    ``interim_weights`` are the a_i of Eq. 5 per slot; ``semantic_learning=False`` sets them all to
    0 (Table 6, "w/o SPL"); ``long_range=False`` makes every PDC dilation 1 ("w/o LSCM").
    ``feat_norm`` (not in the paper; default off) feeds the branches an RMS-normalised F
    (:func:`~segprompt.tuning.spm_layers.channel_rms_norm`), a design choice the paper leaves open.
    ``prior_resolution`` is the side of the stored M0 grid. Other options configure each SPM; the
    group numbers are the paper's at C = 256 and, with ``scale_groups`` (default), scale with
    ``channels`` so each group keeps its width (docs/spm.md).

    ``channels`` is the SPM width C, a multiple of 4, or ``"auto"`` (the default): C follows the
    backbone, half the median of its slot widths rounded to a multiple of 8, between 8 and the
    paper's 256 (:func:`~segprompt.tuning.spm_layers.auto_channels`; docs/spm.md, "C follows the
    backbone"). That is 256 on ResNet-101 and ViT-L, the paper's C (its recipes also pin
    ``channels: 256``), 16 on the smoke ResNet-18 and 24 on EfficientNet-Lite0. :meth:`apply` logs a
    warning when the SPMs hold more parameters than full tuning trains.
    """

    def __init__(self, stages: list[int] = (1, 2, 3, 4), recurrent: int = 1,
                 channels: int | Literal["auto"] = "auto",
                 map_in_groups: int = 2, prompt_in_groups: int = 1, in_mode: str = "concat",
                 map_out_groups: int = 2, prompt_out_groups: int = 32,
                 dilations: tuple[int, int, int, int] = (1, 2, 4, 8), pdc_groups: int = 4,
                 pdc_fuse_groups: int = 4, pdc_split: bool = True, bias: bool = True,
                 interim_weights: list[float] = INTERIM_WEIGHTS, semantic_learning: bool = True,
                 long_range: bool = True, prior_resolution: int = 64, bn_eval: bool = True,
                 scale_groups: bool = True, feat_norm: bool = False):
        if channels != "auto" and (isinstance(channels, bool) or not isinstance(channels, int)):
            raise ValueError(f"tuning.channels is {channels!r}: set an int (a multiple of 4, e.g. 64) or 'auto'")
        self.stages = sorted(set(stages))
        self.channels = channels
        self.spm_kwargs = dict(recurrent=recurrent, map_in_groups=map_in_groups,
                               prompt_in_groups=prompt_in_groups, in_mode=in_mode, map_out_groups=map_out_groups,
                               prompt_out_groups=prompt_out_groups,
                               dilations=tuple(dilations) if long_range else (1, 1, 1, 1),
                               pdc_groups=pdc_groups, pdc_fuse_groups=pdc_fuse_groups, pdc_split=pdc_split, bias=bias,
                               scale_groups=scale_groups, feat_norm=feat_norm)
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
        full = sum(p.numel() for p in model.parameters() if p.requires_grad)  # full tuning's (as built)
        freeze(backbone, self.bn_eval)
        k = ctx.num_classes
        recognition = getattr(model, "task", "segmentation") == "recognition"
        prior = self._prior(ctx, backbone, 1 if recognition else self.prior_resolution)
        if recognition:
            prior = prior.reshape(k)
        spm_cls = SPMVector if recognition else SPM
        c = auto_channels(slots) if self.channels == "auto" else self.channels
        spms = {s: spm_cls(slots[s - 1], k, channels=c, **self.spm_kwargs) for s in self.stages}
        weights = {s: self.interim_weights[s - 1] for s in self.stages}
        chain = SPMChain(spms, prior, weights, model.decode_head.loss_fn, model.align_corners)
        log.info("SPM width C = %d (tuning.channels: %s; slot widths %s)", c, self.channels,
                 "/".join(map(str, slots)))
        warning = oversize_warning(sum(p.numel() for p in chain.parameters()), full, self._fix(c, slots))
        if warning:
            log.warning(warning)
        backbone.stage_hook = chain
        model.insert(chain)  # its losses, diagnostics and views (M0 follows the input's view)

    def _fix(self, c: int, slots: list[int]) -> str:
        """What to set when the SPMs outnumber full tuning (the end of the oversize warning)."""
        auto = auto_channels(slots)
        now = f"'auto' = {c}" if self.channels == "auto" else f"{c}; 'auto' gives {auto} on this backbone"
        return (f"set a smaller tuning.channels (now {now}; an SPM grows with C, its PDCs with C squared) "
                f"or fewer tuning.stages (now {self.stages})")

    def _prior(self, ctx: TuningContext, backbone: nn.Module, r: int) -> torch.Tensor:
        k = ctx.num_classes
        device = next(backbone.parameters()).device
        if device.type == "meta" or ctx.class_prior is None:
            return torch.full((k, r, r), 1.0 / k, device=device)
        prior = np.array(ctx.class_prior(r), dtype=np.float32)
        if prior.shape != (k, r, r):
            raise ValueError(f"class prior has shape {prior.shape}, expected {(k, r, r)}")
        return torch.from_numpy(prior)
