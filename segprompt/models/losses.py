"""Segmentation losses."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.errors import SegpromptError


class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy with an ignore index.

    ``avg_non_ignore=False`` (MMSegmentation's default) divides the summed loss by all pixels,
    ignored ones included; ``True`` divides by the labelled pixels only. With the default the
    loss of a global batch is exactly the mean of equal-sized per-process losses, so DDP gives
    the same gradient as one process.
    """

    def __init__(self, ignore_index: int = 255, class_weight: list[float] | None = None,
                 avg_non_ignore: bool = False):
        super().__init__()
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore
        self.register_buffer("class_weight", None if class_weight is None else torch.tensor(class_weight),
                             persistent=False)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), label, weight=self.class_weight,
                               ignore_index=self.ignore_index, reduction="none")
        if self.avg_non_ignore:
            return loss.sum() / (label != self.ignore_index).sum().clamp_min(1)
        return loss.mean()


class OhemCrossEntropyLoss(nn.Module):
    """Cross-entropy with online hard example mining, in the three forms STDC-Seg runs have used
    (``docs/stdc_clip.md``, "OHEM"). ``min_kept`` defaults to B*H*W // 16 of the batch on
    this process (the original's n_min = images per GPU x crop area / 16).

    * ``original`` (STDC-Seg ``OhemCELoss``, genuine OHEM): per-pixel CE (ignored pixels give 0 and
      stay in the ranking), sorted descending; if the loss at rank ``min_kept`` (0-based, as the
      original indexes it) exceeds ``-log(thresh)``, the mean over every pixel above it, else the
      mean of the top ``min_kept``. Computed per process, so it depends on the per-process batch.
    * ``mmseg-fork`` (MMSegmentation's ``OHEMPixelSampler`` used by the paper's fork): keep the
      labelled pixels whose target-class probability is below max(``thresh``, the probability at
      rank ``min_kept x B`` of the ascending valid ones); the kept pixels' CE is summed and divided
      by all B*H*W pixels. MMSegmentation multiplies ``min_kept`` by the batch size, so with the
      configured B*H*W/16 the quota covers the whole batch and this is plain CE -- apart from the
      most confident pixel(s), dropped when their probability reaches ``thresh``.
    * ``off``: plain CE averaged over all pixels (MMSegmentation's default reduction).

    The paper's numbers were trained with ``mmseg-fork`` (effectively ``off``); use either to
    reproduce them, ``original`` to reproduce STDC-Seg's own recipe.
    """

    MODES = ("original", "mmseg-fork", "off")

    def __init__(self, ignore_index: int = 255, mode: Literal["original", "mmseg-fork", "off"] = "original",
                 thresh: float = 0.7, min_kept: int | None = None):
        super().__init__()
        if mode not in self.MODES:
            raise SegpromptError(f"loss.mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if not 0.0 < thresh <= 1.0:
            raise SegpromptError(f"loss.thresh is a probability in (0, 1], got {thresh}")
        if min_kept is not None and min_kept < 1:
            raise SegpromptError(f"loss.min_kept must be a positive number of pixels (or null), got {min_kept}")
        self.ignore_index = ignore_index
        self.mode = mode
        self.thresh = thresh
        self.min_kept = min_kept

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = F.cross_entropy(logits, label, ignore_index=self.ignore_index, reduction="none")
        if self.mode == "off":
            return loss.mean()
        min_kept = self.min_kept if self.min_kept is not None else label.numel() // 16
        if self.mode == "original":
            return self._original(loss.flatten(), min_kept)
        return self._mmseg_fork(logits, label, loss, min_kept * label.shape[0])

    def _original(self, loss: torch.Tensor, n_min: int) -> torch.Tensor:
        loss = loss.sort(descending=True).values
        thresh = -torch.log(torch.tensor(self.thresh, dtype=loss.dtype, device=loss.device))
        if n_min < loss.numel() and loss[n_min] > thresh:
            return loss[loss > thresh].mean()
        return loss[:n_min].mean()

    def _mmseg_fork(self, logits: torch.Tensor, label: torch.Tensor, loss: torch.Tensor,
                    batch_kept: int) -> torch.Tensor:
        with torch.no_grad():
            valid = label != self.ignore_index
            target = label.masked_fill(~valid, 0).unsqueeze(1)
            prob = logits.softmax(dim=1).gather(1, target).squeeze(1)
            ranked = prob[valid].sort().values
            kth = ranked[min(batch_kept, ranked.numel() - 1)].item() if ranked.numel() else 0.0
            keep = valid & (prob < max(kth, self.thresh))
        return (loss * keep).sum() / loss.numel()
