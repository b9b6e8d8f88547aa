"""Watching training: TensorBoard event files (runtime.tensorboard), `segprompt plot`, and a smoke
recipe that learns more than the majority class."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import write_recipe

from segprompt.errors import SegpromptError
from segprompt.experiments.plot import plot_runs, read_curves
from segprompt.training.launch import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TB_ON = ["runtime.tensorboard=true", "checkpoint.keep=3"]


def _events(run: Path):
    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("tb")
    recipe = write_recipe(tmp / "tiny.yaml", synthetic_root)
    return train(recipe, TB_ON, out=tmp / "run"), recipe


def test_tensorboard_scalars_and_overlays_match_metrics_jsonl(tb_run, synthetic_root):
    run, _ = tb_run
    acc = _events(run)
    tags = acc.Tags()
    classes = json.loads((synthetic_root / "meta.json").read_text())["classes"]
    expected = {"train/loss", "train/loss_seg", "train/loss_aux0", "train/lr", "val/mIoU", "val/aAcc", "val/mAcc",
                *(f"val_IoU/{c}" for c in classes)}
    assert expected <= set(tags["scalars"])
    records = _records(run)
    train_recs = [r for r in records if "loss" in r]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["iter"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train_recs], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([r["lr"] for r in train_recs], rel=1e-6)
    evals = [r for r in records if "split" in r]
    assert [(e.step, e.value) for e in acc.Scalars("val/mIoU")] == \
        [(r["iter"], pytest.approx(r["mIoU"], rel=1e-6)) for r in evals]
    final = json.loads((run / "eval.json").read_text())
    per_class = {c["class"]: c["IoU"] for c in final["per_class"]}
    assert acc.Scalars("val_IoU/background")[-1].value == pytest.approx(per_class["background"], rel=1e-6)
    # four validation images per evaluation: ground truth | prediction, at the image's size
    overlays = sorted(tags["images"])
    assert overlays == [f"val_overlay/{i:05d}" for i in range(4)]
    shots = acc.Images(overlays[0])
    assert [s.step for s in shots] == [3, 6]
    decoded = cv2.imdecode(np.frombuffer(shots[-1].encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (64, 128, 3) and (shots[-1].height, shots[-1].width) == (64, 128)


def test_tensorboard_is_off_by_default_and_does_not_change_training(tb_run, tmp_path):
    run, recipe = tb_run
    plain = train(recipe, ["checkpoint.keep=3"], out=tmp_path / "plain")
    assert not (plain / "tb").exists()
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the overlays consume no randomness


def test_resumed_run_appends_without_duplicating_steps(tb_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tb_run[0], run)
    # as if the process had died after iteration 6 and its last checkpoint were iteration 3's
    train(tb_run[1], TB_ON, resume=str(run / "checkpoints" / "iter_0000003.pt"))
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2
    acc = _events(run)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("val/mIoU")] == [3, 6]
    assert [s.step for s in acc.Images("val_overlay/00000")] == [3, 6]
    assert [r["iter"] for r in read_curves(run).train] == [1, 2, 3, 4, 5, 6]  # plot drops the void records too


def test_missing_tensorboard_is_a_clear_error_at_start(recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    with pytest.raises(SegpromptError, match=r"runtime.loggers names tensorboard \(or runtime.tensorboard is true\) .*pip install 'segprompt\[watch\]'"):
        train(recipe, ["runtime.tensorboard=true"], out=tmp_path / "run")
    assert not (tmp_path / "run" / "tb").exists() and not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    train(recipe, ["schedule.iters=1"], out=tmp_path / "run")  # the failed start does not block its --out


@pytest.mark.slow
def test_only_rank_0_writes_under_ddp(recipe, tmp_path):
    from conftest import run_cli

    res = run_cli("train", str(recipe), "--out", str(tmp_path / "run"), "--set", "runtime.tensorboard=true",
                  torchrun=2)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(list((tmp_path / "run" / "tb").iterdir())) == 1  # one event file: rank 0's
    acc = _events(tmp_path / "run")
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("val/mIoU")] == [3, 6]


# ------------------------------------------------------------------------------------------ plot

def _png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _has_colour(img: np.ndarray, hex_colour: str) -> bool:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img.astype(int) - rgb).sum(-1) < 30).sum()) > 50


def _plot(tmp_path: Path, runs: list[Path], name: str, **kw) -> Path:
    out = tmp_path / name
    assert plot_runs(runs, out, **kw) == []  # no notes: every run has losses and evaluations
    return out


def test_plot_draws_one_and_two_runs(tb_run, tmp_path):
    first = tb_run[0]
    other = tmp_path / "other"  # a second run with other numbers (identical lines would hide each other)
    other.mkdir()
    recs = [{**r, "loss": r["loss"] / 2} if "loss" in r else {**r, "aAcc": r["aAcc"] / 2} if "aAcc" in r else r
            for r in _records(first)]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    one = _png(_plot(tmp_path, [first], "one.png"))
    two = _png(_plot(tmp_path, [first, other], "two.png", metric="aAcc"))
    assert one.shape == two.shape == (504, 1320, 3)  # 11 x 4.2 inches at 120 dpi
    blue, orange = "#1f77b4", "#ff7f0e"  # matplotlib's first two line colours: one per run
    assert _has_colour(one, blue) and not _has_colour(one, orange)
    assert _has_colour(two, blue) and _has_colour(two, orange)


def test_plot_refuses_bad_input_and_never_overwrites(tb_run, tmp_path):
    run = tb_run[0]
    out = tmp_path / "curves.png"
    out.write_bytes(b"mine")
    with pytest.raises(SegpromptError, match=r"'.*curves.png' already exists; .*--force"):
        plot_runs([run], out)
    assert out.read_bytes() == b"mine"
    plot_runs([run], out, force=True)
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SegpromptError, match=r"--metric 'miou' is not recorded .*choose one of: .*aAcc.*mIoU"):
        plot_runs([run], tmp_path / "x.png", metric="miou")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegpromptError, match=r"'.*empty' has no metrics.jsonl"):
        plot_runs([run, tmp_path / "empty"], tmp_path / "x.png")
    with pytest.raises(SegpromptError, match=r"must end in .png, .svg, .pdf"):
        plot_runs([run], tmp_path / "x.jpg")
    assert not (tmp_path / "x.png").exists()


def test_plot_reads_resumed_and_unfinished_runs(tmp_path):
    run = tmp_path / "resumed"
    run.mkdir()
    lines = [{"iter": i, "lr": 0.1, "loss": 2.0 - i / 10, "time": 0.1} for i in (1, 2, 3, 4)]
    lines += [{"iter": 2, "split": "val", "mIoU": 10.0, "images": 3, "mode": "whole"},
              {"event": "resume", "iter": 2, "checkpoint": "last.pt"},
              {"iter": 3, "lr": 0.1, "loss": 1.5, "time": 0.1}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"iter": 4, "lo')  # cut by a kill
    curves = read_curves(run)
    assert [(r["iter"], r["loss"]) for r in curves.train] == [(1, 1.9), (2, 1.8), (3, 1.5)]
    assert [e["iter"] for e in curves.evals] == [2]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text(json.dumps({"iter": 1, "lr": 0.1, "loss": 1.0}) + "\n")
    notes = plot_runs([run, fresh], tmp_path / "c.svg")
    assert notes == [f"'{fresh}' has no mIoU evaluation yet"]
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    # what an old refused start left (config, env, lock, a metrics.jsonl without a training record)
    remains = tmp_path / "refused"
    remains.mkdir()
    for name in ("config.yaml", "env.json", ".lock"):
        (remains / name).write_text("{}")
    (remains / "metrics.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    assert plot_runs([run, remains, fresh], tmp_path / "d.svg") == notes  # passed over without a word
    with pytest.raises(SegpromptError, match="nothing to plot: .*refused ended before their first iteration"):
        plot_runs([remains], tmp_path / "e.svg")


def test_plot_command(tb_run, tmp_path):
    from typer.testing import CliRunner

    from segprompt.cli import app

    res = CliRunner().invoke(app, ["plot", str(tb_run[0]), "--out", str(tmp_path / "p.png"), "--metric", "mDice"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and _png(tmp_path / "p.png").shape == (504, 1320, 3)


# ----------------------------------------------------------------------------------------- smoke

def test_smoke_recipe_beats_the_majority_class(tmp_path):
    """The shipped smoke recipe on `segprompt prepare synthetic`'s default data, seed 0."""
    from segprompt.data.synthetic import generate_synthetic

    meta = generate_synthetic(tmp_path / "synthetic")
    run = train("smoke", [f"data.root={tmp_path / 'synthetic'}", "runtime.device=cpu", "runtime.num_workers=0"],
                out=tmp_path / "run")
    result = json.loads((run / "eval.json").read_text())
    counts = np.zeros(256, np.int64)
    for path in sorted((tmp_path / "synthetic" / "ann_dir" / "val").glob("*.png")):
        counts += np.bincount(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ravel(), minlength=256)
    counts = counts[:meta.num_classes]  # 255 (ignore) left out, as the metric does
    # predicting the most frequent class everywhere: IoU = its pixel share for it, 0 for every other class
    majority = 100 * counts.max() / counts.sum() / meta.num_classes
    assert result["mIoU"] > majority + 15, (result["mIoU"], majority)
    learned = [c["class"] for c in result["per_class"][1:] if c["IoU"] is not None and c["IoU"] > 20]
    assert len(learned) >= 2, result["per_class"]  # not the background alone


def test_confusion_plot_reads_eval_json_with_class_names(tb_run, tmp_path):
    from typer.testing import CliRunner

    from segprompt.cli import app
    from segprompt.experiments.plot import plot_confusion

    run = tmp_path / "run"
    run.mkdir()
    k = 3
    matrix = [[90, 10, 0], [0, 0, 0], [5, 5, 40]]  # class 1 never in the ground truth: an empty row
    (run / "eval.json").write_text(json.dumps({
        "split": "val", "iter": 7, "mIoU": 50.0, "confusion_matrix": matrix,
        "per_class": [{"class": n} for n in ("sky", "tree", "road")]}))
    assert plot_confusion(run, tmp_path / "cm.png") == run / "eval.json"
    img = _png(tmp_path / "cm.png")
    assert _has_colour(img, "#08306b")  # the darkest blue of a (nearly) full diagonal cell
    with pytest.raises(SegpromptError, match="already exists"):
        plot_confusion(run, tmp_path / "cm.png")
    with pytest.raises(SegpromptError, match=r"eval_test.json' does not exist: evaluate first \(`segprompt eval"):
        plot_confusion(run, tmp_path / "t.png", split="test")
    (run / "eval.json").write_text(json.dumps({"confusion_matrix": [[1, 2]], "per_class": [{"class": "a"}] * k}))
    with pytest.raises(SegpromptError, match="is not 3 x 3"):
        plot_confusion(run, tmp_path / "bad.png")
    # a real run's eval.json, through the command
    res = CliRunner().invoke(app, ["plot", str(tb_run[0]), "--confusion", "--out", str(tmp_path / "real.png")])
    assert res.exit_code == 0, res.output
    assert _png(tmp_path / "real.png").shape[0] > 400


# ---------------------------------------------------------------------------------------- browse

def test_browse_writes_the_exact_samples_training_reads_at_an_iteration(recipe, tmp_path, monkeypatch):
    """The batches the training loop collates (2 micro-batches of 2, accumulated) against browse's
    samples of the same iterations: the same images, crops, flips and labels, in order."""
    import segprompt.training.loop as loop
    from segprompt.training.browse import browse, training_samples

    seen = []

    def recording(batch):
        out = loop_collate(batch)
        seen.append(out)
        return out

    loop_collate = loop.collate
    monkeypatch.setattr(loop, "collate", recording)
    overrides = ["schedule.iters=3", "evaluation.interval=0", "optimizer.accum_steps=2", "data.batch_size=4",
                 "runtime.seed=5"]
    train(recipe, overrides, out=tmp_path / "run")
    from segprompt.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    stream = training_samples(cfg, 2)
    trained = [(s, i) for batch in seen[2:4] for s, i in zip(batch["stem"], batch["img"])]  # iteration 2
    for stem, img in trained:
        step, _, sample = next(stream)
        assert step == 2 and sample["stem"] == stem and torch.equal(sample["img"], img)
    files = browse(recipe, tmp_path / "samples", count=6, iteration=2, overrides=overrides)
    assert [f.name.split("_")[0] for f in files] == ["iter000002"] * 4 + ["iter000003"] * 2
    first = _png(files[0])
    h, w = trained[0][1].shape[1:]
    assert first.shape == (h, 2 * w, 3) and (first[:, :w] == trained[0][1].permute(1, 2, 0).numpy()).all()
    with pytest.raises(SegpromptError, match="already exists"):
        browse(recipe, tmp_path / "samples", count=1, iteration=2, overrides=overrides)
