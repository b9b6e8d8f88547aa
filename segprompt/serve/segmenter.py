"""``segprompt.load(...)``: a trained model ready to segment images from Python (docs/api.md).

It reads through the one loader (:mod:`segprompt.runs.load`) and segments with the recipe's test
pipeline and inference, as ``segprompt predict`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segprompt.build import build_test_transform
from segprompt.data.dataset import read_image
from segprompt.data.transforms import normalize, to_tensor
from segprompt.distributed import resolve_device
from segprompt.errors import SegpromptError
from segprompt.evaluation.inference import check_mode, segment_logits
from segprompt.runs.load import Source, build_source_model, read_source

ImageLike = str | Path | np.ndarray


class Segmenter:
    """A trained model ready to segment images, with what it was trained on: its recipe (``cfg``),
    class names, palette, the file it came from and the training iteration.

    ``segmenter.predict(images)`` runs the recipe's test pipeline and inference (as ``segprompt
    predict`` does) and returns a label map (H x W, int64 class ids) per image."""

    def __init__(self, src: Source, model: nn.Module, device: torch.device):
        self.cfg, self.meta, self.model, self.device = src.cfg, src.meta, model, device
        self.checkpoint, self.run_dir = src.path, src.run_dir
        self.iteration = src.state.get("iteration")
        self._transform = build_test_transform(src.cfg)

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self.meta.palette]

    def __repr__(self) -> str:
        return (f"Segmenter({self.cfg.tuning['name']} on {self.cfg.model.backbone['name']}, "
                f"{len(self.classes)} classes, '{self.checkpoint}', iteration {self.iteration}, {self.device})")

    @torch.no_grad()
    def predict(self, images: ImageLike | Sequence[ImageLike], *, mode: str | None = None,
                tta: bool | None = None) -> np.ndarray | list[np.ndarray]:
        """Label maps of ``images``: file paths or RGB uint8 arrays (H x W x 3). One image gives one
        map; a list gives a list."""
        single = isinstance(images, (str, Path, np.ndarray))
        mode = mode or self.cfg.evaluation.mode
        check_mode(self.cfg, mode)
        tta = self.cfg.evaluation.tta if tta is None else tta
        out = []
        for image in [images] if single else list(images):
            rgb = read_image(Path(image)) if isinstance(image, (str, Path)) else _rgb(image)
            img = to_tensor(self._transform(rgb))[None].to(self.device)
            img = normalize(img, self.cfg.data.mean, self.cfg.data.std)
            logits = segment_logits(self.model, img, rgb.shape[:2], self.cfg, self.device, mode=mode, tta=tta)
            out.append(logits.argmax(1)[0].cpu().numpy())
        return out[0] if single else out


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SegpromptError(f"an image array must be RGB uint8 of shape H x W x 3, got {image.dtype} "
                             f"{tuple(image.shape)}")
    return np.ascontiguousarray(image)


def load(target: str | Path, checkpoint: str | None = None, *, weights: str | Path | None = None,
         overrides: Sequence[str] = (), device: str | torch.device = "cpu") -> Segmenter:
    """A trained model from a run directory, a checkpoint file or a delta (docs/api.md)."""
    src = read_source(target, checkpoint, overrides=overrides, weights=weights)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model = build_source_model(src).to(dev)
    return Segmenter(src, model, dev)
