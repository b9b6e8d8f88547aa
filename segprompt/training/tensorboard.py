"""TensorBoard logging of a training run: ``runtime.loggers: [tensorboard]`` or ``runtime.tensorboard:
true`` (docs/watch.md; :mod:`.trackers` holds every logger).

Rank 0 writes ``RUN/tb/``; the other ranks write nothing. Every ``runtime.log_interval`` the
training record that goes to ``metrics.jsonl`` becomes ``train/<key>`` scalars (``loss``, its
parts, ``lr``, ``time``, the SPM diagnostics); after every evaluation the summary metrics become
``val/<metric>``, the per-class IoU ``val_IoU/<class>`` and, for segmentation, the first
:data:`OVERLAY_IMAGES` validation images ``val_overlay/<stem>``: ground truth (left) and prediction
(right), class colours blended on the image. The step is the iteration, as in ``metrics.jsonl``.

The event file is opened at the first write, so a run that fails before its first iteration leaves
no ``tb/`` (such a start stays reusable, docs/runs.md). Each start opens a new event file with
``purge_step`` = its first iteration: TensorBoard then hides what an interrupted run logged after
the checkpoint the run resumed from, so no step appears twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segprompt.config import Recipe
from segprompt.data.dataset import collate, read_image
from segprompt.data.transforms import normalize
from segprompt.errors import SegpromptError
from segprompt.evaluation.inference import overlay, segment_logits

__all__ = ["TB_DIR", "OVERLAY_IMAGES", "TensorBoardLog", "overlay_images"]

TB_DIR = "tb"
OVERLAY_IMAGES = 4  # validation images drawn after each evaluation


def _summary_writer() -> type:
    # function-level import: tensorboard is the optional extra segprompt[watch], needed only when
    # runtime.tensorboard is on
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise SegpromptError(f"runtime.loggers names tensorboard (or runtime.tensorboard is true) but TensorBoard "
                             f"cannot be imported ({e}); install it with `pip install 'segprompt[watch]'`, or turn "
                             f"it off") from None
    return SummaryWriter


class TensorBoardLog:
    """The run's TensorBoard writer; every method is a no-op when it is not ``enabled`` or ``write``
    is false (ranks other than 0). ``first_iter`` is the iteration this start continues from (0 for
    a new run). The import is checked on every rank, so all of them stop together."""

    def __init__(self, run_dir: Path, cfg: Recipe, *, write: bool, first_iter: int, enabled: bool):
        self.cfg = cfg
        self.log_dir = Path(run_dir) / TB_DIR
        self.first_iter = first_iter
        self._cls = _summary_writer() if enabled else None
        self.enabled = self._cls is not None and write
        self._writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open(self):
        if self._writer is None:
            self._writer = self._cls(log_dir=str(self.log_dir), purge_step=self.first_iter + 1)
        return self._writer

    def scalars(self, step: int, record: dict[str, Any], prefix: str = "train") -> None:
        """``<prefix>/<key>`` for every number of ``record`` but its ``iter``."""
        if not self.enabled:
            return
        writer = self._open()
        for key, value in record.items():
            if key != "iter" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{prefix}/{key}", value, step)
        writer.flush()

    def evaluation(self, step: int, result: dict[str, Any], images: list[tuple[str, np.ndarray]]) -> None:
        """An evaluation's metrics, per-class (and per-category) IoU, and prediction overlays
        (:func:`overlay_images`)."""
        if not self.enabled:
            return
        writer = self._open()
        for key, value in result.items():
            if isinstance(value, float):  # None (NaN) metrics are left out
                writer.add_scalar(f"val/{key}", value, step)
        for row in result.get("per_class", []):
            if row["IoU"] is not None:
                writer.add_scalar(f"val_IoU/{row['class']}", row["IoU"], step)
        for name, value in (result.get("categoryIoU") or {}).items():
            if value is not None:
                writer.add_scalar(f"val_categoryIoU/{name}", value, step)
        for stem, image in images:
            writer.add_image(f"val_overlay/{stem}", image, step, dataformats="HWC")
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@torch.no_grad()
def overlay_images(model: nn.Module, dataset: Any, cfg: Recipe, device: torch.device,
                   count: int) -> list[tuple[str, np.ndarray]]:
    """``(stem, H x 2W x 3 uint8 RGB)`` for the first ``count`` readable images of ``dataset``: the
    ground truth and the prediction (the evaluation's inference settings) side by side, blended on
    the image. Random states are left as they were, so training continues exactly as without."""
    was_training = model.training
    model.eval()
    palette = dataset.meta.palette
    out = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i in range(min(count, len(dataset))):
                batch = collate([dataset[i]])
                if batch["img"] is None:  # an unreadable image that data.skip_bad_images skips
                    continue
                img = normalize(batch["img"].to(device), cfg.data.mean, cfg.data.std)
                label = batch["label"][0].numpy()
                logits = segment_logits(model, img, label.shape, cfg, device, mode=cfg.evaluation.mode,
                                        tta=cfg.evaluation.tta)
                pred = logits.argmax(1)[0].cpu().numpy()
                image = read_image(Path(batch["path"][0]))
                out.append((batch["stem"][0], np.concatenate([overlay(label, image, palette),
                                                              overlay(pred, image, palette)], axis=1)))
    finally:
        model.train(was_training)
    return out
