"""SPM sized for its backbone (issue 19, item 7): ``tuning.channels: auto``, the warning when the
inserted modules outnumber full tuning's parameters, and one "% of full" for count-params, the
training log and the demo (docs/spm.md, "C follows the backbone"; docs/measurement.md, "% of full")."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import pytest
import torch

from segprompt.config import load_recipe
from segprompt.measure.params import breakdown, build_counted, percent_of_full
from segprompt.tuning.spm_layers import auto_channels

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
LITE0 = "model.backbone={name: timm, model: efficientnet_lite0, output_stride: 8}"
SHARE = re.compile(r"trainable ([\d,]+) parameters.*?= ([\d.]+)% of full tuning's ([\d,]+)")


def _spm_widths(model) -> set[int]:
    return {spm.map_pdc.fuse.in_channels for spm in model.backbone.stage_hook.spms.values()}


@contextlib.contextmanager
def _records(name: str, level: int = logging.INFO):
    """The records (``level`` and up) that reach logger ``name``, whatever handlers the process set up."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger, keep = logging.getLogger(name), Keep(level)
    old = logger.level
    logger.setLevel(level)
    logger.addHandler(keep)
    try:
        yield records
    finally:
        logger.removeHandler(keep)
        logger.setLevel(old)


def _build_log(overrides: list[str], k: int = 6) -> list[logging.LogRecord]:
    """What building the smoke model with ``overrides`` logs (INFO and up), as the logger a training
    run sets up (``segprompt``) receives it; built on the meta device."""
    from segprompt.build import apply_tuning, build_segmentor
    from segprompt.data.meta import DatasetMeta
    from segprompt.tuning import TuningContext

    cfg = load_recipe(SMOKE, overrides)
    meta = DatasetMeta(name="m", classes=[f"c{i}" for i in range(k)], palette=[[0, 0, 0]] * k)
    with _records("segprompt") as records, torch.device("meta"):
        apply_tuning(build_segmentor(cfg, meta, load_pretrained=False), cfg, TuningContext(k))
    return records


def test_auto_width_rule():
    assert auto_channels([64, 256, 512, 1024, 2048]) == 256  # ResNet-101: the paper's C
    assert auto_channels([1024] * 4) == 256  # ViT-L: capped at the paper's C (half the median is 512)
    assert auto_channels([12, 12, 24, 48, 96]) == 16  # the smoke ResNet-18: 12 rounds half up to 16
    assert auto_channels([16, 24, 40, 112, 320]) == 24  # EfficientNet-Lite0: 20 rounds half up to 24
    assert auto_channels([96, 192, 384, 768]) == 144  # an even number of slots: the mean of the middle two
    assert auto_channels([3, 4]) == 8  # never below 8
    with pytest.raises(ValueError, match="slot widths"):
        auto_channels([])


def test_auto_is_the_papers_256_on_resnet101_and_changes_no_paper_count():
    paper = "recipes/spm/ade20k_r101_spm_stages1-2.yaml"  # pins channels: 256, like every paper recipe
    pinned = breakdown(load_recipe(REPO / paper), 150)
    auto = breakdown(load_recipe(REPO / paper, ["tuning.channels=auto"]), 150)
    model, _ = build_counted(load_recipe(REPO / paper, ["tuning.channels=auto"]), 150)
    assert model.backbone.slot_channels == [64, 256, 512, 1024, 2048]
    assert next(model.parameters()).device.type == "meta" and _spm_widths(model) == {256}
    assert auto.groups == pinned.groups and auto.groups["prompt"]["total"] > 0
    assert auto.share == pinned.share and not auto.warnings


def test_auto_keeps_the_smoke_prompt_a_fraction_of_full_tuning():
    model, _ = build_counted(load_recipe(SMOKE, ["tuning.name=spm"]), 6)
    assert _spm_widths(model) == {16}
    [info] = _build_log(["tuning.name=spm"])
    assert info.levelno == logging.INFO
    assert info.getMessage() == "SPM width C = 16 (tuning.channels: auto; slot widths 12/12/24/48/96)"
    b = breakdown(load_recipe(SMOKE, ["tuning.name=spm"]), 6)
    assert 0 < b.share.inserted < b.share.full / 20  # 12,152 of 467,098
    assert b.share.trainable < b.share.full / 4 and b.percent_of_full == pytest.approx(17.99, abs=0.01)
    assert not b.warnings
    lite0, _ = build_counted(load_recipe(SMOKE, ["tuning.name=spm", LITE0]), 6)
    assert _spm_widths(lite0) == {24}


def test_warning_when_the_spms_outnumber_full_tuning():
    with _records("segprompt", logging.WARNING) as leaked:
        big = breakdown(load_recipe(SMOKE, ["tuning.name=spm", "tuning.channels=256"]), 6)
    assert not leaked  # count-params keeps the build's warnings, to print them itself
    assert big.share.inserted == 484_472 > big.share.full == 467_098
    [warning] = big.warnings
    assert "484,472" in warning and "467,098" in warning and "1.04 times" in warning
    assert "tuning.channels (now 256; 'auto' gives 16 on this backbone" in warning
    assert "tuning.stages (now [1, 2, 3, 4])" in warning
    assert not breakdown(load_recipe(SMOKE, ["tuning.name=spm", "tuning.channels=64"]), 6).warnings
    [other] = breakdown(load_recipe(SMOKE, ["tuning.name=adapter", "tuning.channels=512"]), 6).warnings
    assert "inserts 603,496 parameters, 1.29 times as many as" in other and "tuning 'adapter'" in other


def test_warning_at_build_time_outside_count_params():
    warned = [r.getMessage() for r in _build_log(["tuning.name=spm", "tuning.channels=256"])
              if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "inserts 484,472 parameters, 1.04 times as many as" in warned[0]
    assert "tuning.channels (now 256;" in warned[0]
    for quiet in (["tuning.channels=auto"], ["tuning.channels=64"], ["tuning.channels=256", "tuning.stages=[1]"]):
        assert [r.levelno for r in _build_log(["tuning.name=spm", *quiet])] == [logging.INFO]


def test_percent_of_full_is_one_definition():
    assert percent_of_full(50, 200) == 25.0
    with pytest.raises(ValueError, match="positive"):
        percent_of_full(1, 0)
    cfg = load_recipe(SMOKE, ["tuning.name=spm"])
    paper, every = breakdown(cfg, 6, "paper"), breakdown(cfg, 6, "all")
    assert paper.trainable < every.trainable  # the table's counts follow --convention (BatchNorm left out) ...
    assert paper.share == every.share  # ... % of full never
    assert paper.percent_of_full == every.percent_of_full == 100 * every.trainable / every.full_tuning
    from segprompt.experiments.demo_report import Row, table_lines, verdict

    rows = [Row("head", "Head", 100, 0.01, [30.0, 31.0]), Row("full", "Full", 400, 0.01, [40.0, 41.0]),
            Row("spm", "SPM", 150, 0.01, [38.0, 39.0])]
    _, lines = table_lines({"zero_shot": None}, rows)
    assert [line[2] for line in lines[1:]] == ["25.0 %", "100.0 %", "37.5 %"]
    assert "with 38 % of full tuning's trainable parameters" in verdict(rows)


@pytest.mark.parametrize("channels", ["256", "auto"])
def test_count_params_and_training_log_print_the_same_percent(tmp_path, synthetic_root, channels):
    from typer.testing import CliRunner

    from segprompt.cli import app
    from segprompt.training.launch import train

    sets = [f"data.root={synthetic_root}", "tuning.name=spm", f"tuning.channels={channels}"]
    res = CliRunner().invoke(app, ["count-params", str(SMOKE), *(x for s in sets for x in ("--set", s))])
    assert res.exit_code == 0, res.output
    counted = SHARE.search(" ".join(res.stdout.split()))
    run = train(SMOKE, [*sets, "schedule.iters=1", "schedule.warmup_iters=0", "evaluation.interval=0",
                        "checkpoint.interval=1", "runtime.num_workers=0", "data.batch_size=2",
                        "data.train.scale=[32,32]", "data.train.crop_size=[32,32]", "data.test.scale=[32,32]"],
                out=tmp_path / "run")
    log = (run / "train.log").read_text()
    logged = SHARE.search(log)
    assert counted and logged and counted.groups() == logged.groups()
    oversized = channels == "256"
    assert float(logged.group(2)) > 100 if oversized else float(logged.group(2)) < 25
    for text in (res.stderr, log):
        assert ("times as many as full tuning trains" in " ".join(text.split())) == oversized
