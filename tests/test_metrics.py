"""ConfusionMatrix / compute_metrics against hand-computed values and an independent numpy count."""

from __future__ import annotations

import io
import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console

from segprompt.evaluation.metrics import (
    ConfusionMatrix,
    compute_metrics,
    format_table,
    summary_line,
)

IGNORE = 255


def _random_batch(rng: np.random.Generator, n: int, k_label: int, k_pred: int, shape=(13, 17)):
    label = rng.integers(0, k_label, size=(n, *shape))
    label[rng.random(label.shape) < 0.2] = IGNORE
    pred = rng.integers(0, k_pred, size=(n, *shape))
    return torch.from_numpy(pred), torch.from_numpy(label)


def _numpy_metrics(preds: np.ndarray, labels: np.ndarray, k: int, beta: float = 1.0) -> dict:
    """Per-class pixel sets counted with numpy over the whole dataset, then the mmseg formulas."""
    valid = labels != IGNORE
    inter, union, area_label, area_pred = (np.zeros(k) for _ in range(4))
    for c in range(k):
        is_label = (labels == c) & valid
        is_pred = (preds == c) & valid
        inter[c] = np.logical_and(is_label, is_pred).sum()
        union[c] = np.logical_or(is_label, is_pred).sum()
        area_label[c] = is_label.sum()
        area_pred[c] = is_pred.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        precision, recall = inter / area_pred, inter / area_label
        per_class = {
            "IoU": inter / union,
            "Acc": inter / area_label,
            "Dice": 2 * inter / (area_pred + area_label),
            "Fscore": (1 + beta**2) * precision * recall / (beta**2 * precision + recall),
            "Precision": precision,
            "Recall": recall,
        }
    out = {"aAcc": inter.sum() / valid.sum() * 100, "pixels": area_label}
    for name, v in per_class.items():
        out[name] = v * 100
        out[f"m{name}"] = np.nanmean(v) * 100
    return out


def _same(actual: float | None, expected: float) -> bool:
    return actual is None if math.isnan(expected) else actual == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_tiny_example_by_hand():
    label = torch.tensor([[0, 0, 1], [1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, label)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    # intersect [1,1,1], label [2,2,1], pred [1,2,2], union [2,3,2]
    m = compute_metrics(cm.mat, ["a", "b", "c"], beta=2.0)
    assert m["aAcc"] == pytest.approx(60.0)
    assert m["mIoU"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3 * 100)
    assert m["mAcc"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3 * 100)
    assert m["mDice"] == pytest.approx((2 / 3 + 2 / 4 + 2 / 3) / 3 * 100)
    assert m["mPrecision"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3 * 100)
    # F2 = 5PR / (4P + R)
    f2 = [5 * 1 * 0.5 / (4 + 0.5), 5 * 0.25 / (2 + 0.5), 5 * 0.5 / (2 + 1)]
    assert [row["Fscore"] for row in m["per_class"]] == pytest.approx([v * 100 for v in f2])
    assert m["mFscore"] == pytest.approx(sum(f2) / 3 * 100)
    assert [row["pixels"] for row in m["per_class"]] == [2, 2, 1]
    assert [row["class"] for row in m["per_class"]] == ["a", "b", "c"]


def test_random_data_matches_independent_numpy_count():
    rng = np.random.default_rng(0)
    # Ground truth uses classes 0..4 only; predictions 0..5: class 5 is predicted but absent from
    # the ground truth (IoU 0, Acc NaN), class 6 appears nowhere (IoU NaN).
    k = 7
    pred, label = _random_batch(rng, 5, k_label=5, k_pred=6)
    cm = ConfusionMatrix(k)
    cm.update(pred, label)
    names = [f"c{i}" for i in range(k)]
    for beta in (1.0, 0.5):
        got = compute_metrics(cm.mat, names, beta=beta)
        want = _numpy_metrics(pred.numpy(), label.numpy(), k, beta=beta)
        for key in ("aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall"):
            assert _same(got[key], want[key]), key
        for c, row in enumerate(got["per_class"]):
            assert row["pixels"] == want["pixels"][c]
            for key in ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall"):
                assert _same(row[key], want[key][c]), (c, key)
    absent, nowhere = got["per_class"][5], got["per_class"][6]
    assert absent["IoU"] == 0.0 and absent["Acc"] is None and absent["pixels"] == 0
    assert nowhere["IoU"] is None and nowhere["Dice"] is None
    # The NaN-mean skips undefined classes instead of counting them as 0.
    defined = [row["IoU"] for row in got["per_class"] if row["IoU"] is not None]
    assert got["mIoU"] == pytest.approx(sum(defined) / len(defined))
    json.dumps(got, allow_nan=False)  # what the result writer does


def test_accumulating_images_equals_one_concatenated_update():
    rng = np.random.default_rng(1)
    pred, label = _random_batch(rng, 4, k_label=4, k_pred=4)
    per_image = ConfusionMatrix(4)
    for p, lab in zip(pred, label):
        per_image.update(p, lab)
    batched = ConfusionMatrix(4)
    batched.update(pred[:2], label[:2])
    batched.update(pred[2:], label[2:])
    whole = ConfusionMatrix(4)
    whole.update(pred.reshape(-1, pred.shape[-1]), label.reshape(-1, label.shape[-1]))
    assert torch.equal(per_image.mat, whole.mat) and torch.equal(batched.mat, whole.mat)
    whole.reset()
    assert whole.mat.sum() == 0 and whole.mat.dtype == torch.int64


def test_ignored_pixels_are_never_counted():
    rng = np.random.default_rng(2)
    pred, label = _random_batch(rng, 2, k_label=3, k_pred=3)
    cm = ConfusionMatrix(3)
    cm.update(pred, label)
    assert cm.mat.sum() == (label != IGNORE).sum()
    changed = pred.clone()
    changed[label == IGNORE] = (changed[label == IGNORE] + 1) % 3
    cm2 = ConfusionMatrix(3)
    cm2.update(changed, label)
    assert torch.equal(cm.mat, cm2.mat)


def test_custom_ignore_index():
    cm = ConfusionMatrix(3, ignore_index=0)
    cm.update(torch.tensor([1, 2, 2]), torch.tensor([0, 2, 1]))
    assert cm.mat.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 1]]


@pytest.mark.parametrize(
    "pred, label",
    [
        ([0, 1, 1], [0, 3, 1]),  # label == K
        ([0, 1, 1], [0, -1, 1]),  # negative label
        ([0, 1, 7], [0, 1, 1]),  # prediction out of range
    ],
)
def test_out_of_range_ids_raise_and_leave_matrix_untouched(pred, label):
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.tensor(pred), torch.tensor(label))
    assert cm.mat.sum() == 1


def test_bad_inputs_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        compute_metrics(cm.mat, ["a", "b"])


def test_format_table_renders_values_and_missing_entries():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]))
    m = compute_metrics(cm.mat, ["road", "car", "sky"])
    console = Console(file=io.StringIO(), width=120)
    console.print(format_table(m))
    text = console.file.getvalue()
    sky = next(line for line in text.splitlines() if "sky" in line)
    assert "—" in sky  # class 'sky' is absent everywhere: IoU undefined
    assert f"{m['per_class'][0]['IoU']:.2f}" in text  # road IoU 66.67
    assert f"mIoU {m['mIoU']:.2f}" in summary_line(m) and "mFscore" not in summary_line(m)
    narrow = Console(file=io.StringIO(), width=40)  # as train and eval print it: one line at any width
    narrow.print(summary_line(m), soft_wrap=True)
    assert narrow.file.getvalue() == summary_line(m) + "\n" and len(summary_line(m)) > 40


def _all_reduce_worker(rank: int, port: int, preds: torch.Tensor, labels: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(5)
        cm.update(preds[rank], labels[rank])
        cm.all_reduce()
        torch.save(cm.mat, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_gloo_processes_equals_single_process(tmp_path):
    rng = np.random.default_rng(3)
    preds, labels = _random_batch(rng, 2, k_label=5, k_pred=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "mat")
    mp.spawn(_all_reduce_worker, args=(port, preds, labels, out), nprocs=2, join=True)

    single = ConfusionMatrix(5)
    single.update(preds, labels)
    single.all_reduce()  # not initialised here: must be a no-op
    for rank in range(2):
        assert torch.equal(torch.load(f"{out}.{rank}"), single.mat)


def test_category_iou_merges_classes_before_taking_iou():
    """Cityscapes' category scores: confusions inside a category count as correct."""
    mat = torch.tensor([[5, 1, 0], [2, 4, 0], [0, 1, 3]])
    m = compute_metrics(mat, ["road", "sidewalk", "sky"], categories={"flat": ["road", "sidewalk"], "sky": ["sky"]})
    # flat: intersection 12 (5+1+2+4); union = 12 labelled + 13 predicted - 12 = 13. sky: 3 / (4 + 3 - 3)
    assert m["categoryIoU"] == pytest.approx({"flat": 100 * 12 / 13, "sky": 75.0})
    assert m["mIoU_category"] == pytest.approx((100 * 12 / 13 + 75.0) / 2)
    with pytest.raises(ValueError, match="'car'"):
        compute_metrics(mat, ["road", "sidewalk", "sky"], categories={"vehicle": ["car"]})


def test_background_only_predictions_show_no_misleading_fscore():
    # 3 classes, every pixel predicted as class 0: classes 1 and 2 have no precision
    mat = torch.tensor([[80, 0, 0], [10, 0, 0], [10, 0, 0]])
    m = compute_metrics(mat, ["bg", "a", "b"])
    assert m["mFscore_classes"] == 1 and m["mFscore"] > 80 and m["mDice"] < 35  # mmseg's value, and why
    assert "mFscore" not in summary_line(m) and f"mDice {m['mDice']:.2f}" in summary_line(m)
