"""Dataset-level segmentation metrics with MMSegmentation's ``IoUMetric`` conventions.

A K x K confusion matrix (rows = ground truth, columns = prediction) is accumulated on the
device over the whole dataset (and summed across ranks); the metrics are computed once from it.
Pixels labelled ``ignore_index`` are never counted. A class without ground-truth pixels gets NaN
for the ratios whose denominator is its ground-truth area, and NaNs are skipped by the class mean,
as mmseg's ``nanmean`` does (``docs/measurement.md``, "Segmentation metrics").
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from rich.table import Table
from torch import Tensor

__all__ = ["ConfusionMatrix", "compute_metrics", "format_table", "summary_line"]

_TABLE_COLUMNS = ("IoU", "Acc", "Dice", "Fscore")
# mFscore is left out of the summary line: with beta 1 it is mDice where both are defined, and a
# class never predicted has no precision, so mmseg's mean skips it (docs/measurement.md, "mFscore")
_SUMMARY = ("aAcc", "mIoU", "mAcc", "mDice")


class ConfusionMatrix:
    """Running ground-truth x prediction pixel counts for ``num_classes`` classes.

    ``update`` does one ``torch.bincount`` on the device and adds no host synchronisation of its
    own: out-of-range values are detected from the length of the bincount result.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add one image (HxW) or batch (BxHxW) of integer class ids."""
        if pred.shape != label.shape:
            raise ValueError(f"pred and label shapes differ: {tuple(pred.shape)} vs {tuple(label.shape)}")
        if pred.is_floating_point() or label.is_floating_point():
            raise ValueError(f"pred and label must be integer tensors, got {pred.dtype} and {label.dtype}")
        k = self.num_classes
        n = k * k
        pred = pred.reshape(-1).long()
        label = label.reshape(-1).long()
        in_range = (label >= 0) & (label < k) & (pred >= 0) & (pred < k)
        # Bin n collects ignored pixels, bin n + 1 (beyond minlength) any out-of-range pixel.
        index = torch.where(in_range, label * k + pred, n + 1)
        index = torch.where(label == self.ignore_index, n, index)
        counts = torch.bincount(index, minlength=n + 1)
        if counts.numel() > n + 1:
            bad = ~in_range & (label != self.ignore_index)
            raise ValueError(
                f"class ids must lie in [0, {k}) (labels may also be ignore_index={self.ignore_index}); "
                f"found label values {label[bad].unique().tolist()[:10]} "
                f"with prediction values {pred[bad].unique().tolist()[:10]}"
            )
        self.mat += counts[:n].view(k, k)

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks; a no-op unless ``torch.distributed`` is initialised."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def reset(self) -> None:
        self.mat.zero_()


def _to_python(x: Tensor) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value


def category_iou(mat: Tensor, class_names: list[str], categories: dict[str, list[str]]) -> dict[str, float | None]:
    """IoU of groups of classes, as the Cityscapes evaluator's category scores: the confusion
    matrix is merged over each category's classes first (a pixel of one class predicted as
    another class of the same category counts as correct), then IoU is taken per category."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({c for members in categories.values() for c in members} - set(index))
    if unknown:
        raise ValueError(f"categories name classes {unknown} that the dataset does not have")
    mat = torch.as_tensor(mat).detach().cpu().to(torch.float64)
    out: dict[str, float | None] = {}
    for name, members in categories.items():
        idx = torch.tensor([index[c] for c in members])
        inter = mat[idx][:, idx].sum()
        union = mat[idx].sum() + mat[:, idx].sum() - inter
        out[name] = _to_python(inter / union * 100)
    return out


def compute_metrics(mat: Tensor, class_names: list[str], beta: float = 1.0,
                    categories: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """mmseg ``IoUMetric`` metrics from a dataset-level confusion matrix.

    Returns the summaries ``aAcc, mIoU, mAcc, mDice, mFscore, mPrecision, mRecall`` and a
    ``per_class`` list, all in percent (x100, unrounded) as Python floats, with NaN (an undefined
    ratio, e.g. the accuracy of a class absent from the ground truth) as ``None``. As in mmseg, a
    class absent from the ground truth but predicted somewhere has IoU 0, which lowers mIoU.
    """
    counts = torch.as_tensor(mat).detach().cpu()
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(
            f"confusion matrix has shape {tuple(counts.shape)}, expected ({k}, {k}) for {k} class names"
        )
    pixels = counts.sum(dim=1).tolist()
    mat = counts.to(torch.float64)
    intersect = mat.diagonal()
    area_label = mat.sum(dim=1)
    area_pred = mat.sum(dim=0)
    union = area_label + area_pred - intersect
    precision = intersect / area_pred
    recall = intersect / area_label
    per_class = {
        "IoU": intersect / union,
        "Acc": recall,
        "Dice": 2 * intersect / (area_pred + area_label),
        "Fscore": (1 + beta**2) * precision * recall / (beta**2 * precision + recall),
        "Precision": precision,
        "Recall": recall,
    }
    metrics: dict[str, Any] = {"aAcc": _to_python(intersect.sum() / area_label.sum() * 100)}
    for name, values in per_class.items():
        metrics[f"m{name}"] = _to_python(torch.nanmean(values) * 100)
    metrics["mFscore_classes"] = int((~per_class["Fscore"].isnan()).sum())  # the classes mFscore averages
    metrics["per_class"] = [
        {
            "class": class_name,
            **{name: _to_python(values[i] * 100) for name, values in per_class.items()},
            "pixels": int(pixels[i]),
        }
        for i, class_name in enumerate(class_names)
    ]
    if categories:
        metrics["categoryIoU"] = category_iou(counts, class_names, categories)
        values = [v for v in metrics["categoryIoU"].values() if v is not None]
        metrics["mIoU_category"] = sum(values) / len(values) if values else None
    return metrics


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def format_table(metrics: dict[str, Any]) -> Table:
    """A rich table of per-class IoU/Acc/Dice/Fscore (%) and pixel counts (summary_line goes below it:
    as a caption it would wrap at the table's width, splitting it in logs)."""
    table = Table()
    table.add_column("class")
    for name in (*_TABLE_COLUMNS, "pixels"):
        table.add_column(name, justify="right")
    for row in metrics["per_class"]:
        table.add_row(row["class"], *(_fmt(row[name]) for name in _TABLE_COLUMNS), f"{row['pixels']:,}")
    return table


def summary_line(metrics: dict[str, Any]) -> str:
    """``aAcc 84.95  mIoU 32.95  mAcc ...``: print it with ``soft_wrap=True`` (one line, never cut)."""
    return "  ".join(f"{key} {_fmt(metrics[key])}" for key in _SUMMARY)
