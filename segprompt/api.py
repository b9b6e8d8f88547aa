"""The Python API for notebooks and scripts (docs/api.md): the CLI's ``train``, ``eval`` and
``predict`` as three calls, in the spirit of MMSegmentation's ``init_model`` /
``inference_model`` and timm's ``create_model``::

    import segprompt
    run = segprompt.train("smoke", overrides=["data.root=data/synthetic"], out="results/nb")
    model = segprompt.load(run)                 # a run directory, a checkpoint or a delta
    label_map = model.predict("photo.jpg")      # H x W class ids
    metrics = segprompt.evaluate(run)           # eval.json's contents: mIoU, per-class IoU...

Errors are :class:`segprompt.errors.SegpromptError` with the CLI's one-line messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segprompt.serve.segmenter import Segmenter
from segprompt.serve.segmenter import load as _load


def load(target: str | Path, checkpoint: str | None = None, *, weights: str | Path | None = None,
         overrides: Sequence[str] = (), device: str | torch.device = "cpu") -> Segmenter:
    """A trained model, ready to ``.predict(images)``: from a run directory (``checkpoint``: best
    (default), last, deployed or a path), a checkpoint file or a delta. ``weights`` is the frozen
    backbone's file when it is not where the run recorded it (checked by its SHA-256)."""
    return _load(target, checkpoint, weights=weights, overrides=overrides, device=device)


def train(recipe: str | Path, overrides: Sequence[str] = (), *, out: str | Path | None = None,
          resume: str | None = None, load_from: str | Path | None = None,
          load_from_partial: bool = False) -> Path:
    """Train ``recipe`` (a file or a shipped recipe's name) with ``--set``-style ``overrides``
    (``"optimizer.lr=0.01"``) into ``out`` (default ``results/<recipe>/<timestamp>/``); returns the
    run directory. ``resume`` and ``load_from`` are the CLI's ``--resume`` and ``--load-from``."""
    from segprompt.training.launch import train as _train

    return _train(recipe, list(overrides), out=out, resume=resume, load_from=load_from,
                  load_from_partial=load_from_partial)


def evaluate(target: str | Path, *, checkpoint: str | None = None, split: str | None = None,
             mode: str | None = None, tta: bool | None = None, weights: str | Path | None = None,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``segprompt eval``: the metrics of a run directory, checkpoint or delta on its dataset's
    ``split`` (default the validation split), also written to the run's ``eval.json``."""
    from segprompt.evaluation.evaluate import evaluate_checkpoint

    _, result = evaluate_checkpoint(target, checkpoint=checkpoint, overrides=list(overrides), mode=mode, tta=tta,
                                    split=split, weights=weights)
    return result


__all__ = ["Segmenter", "evaluate", "load", "train"]
