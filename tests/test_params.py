"""count-params: group breakdown on the meta device, both counting conventions."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli
from segprompt.config import load_recipe
from segprompt.engine.params import breakdown
from segprompt.models.spm import spm_param_count

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"


def test_breakdown_groups_per_method():
    full = breakdown(load_recipe(SMOKE), 6, "paper")
    head = breakdown(load_recipe(SMOKE, ["tuning.name=head"]), 6, "paper")
    spm = breakdown(load_recipe(SMOKE, ["tuning.name=spm", "tuning.stages=[2,4]", "tuning.channels=32"]), 6, "paper")
    assert full.groups["backbone"]["trainable"] == full.groups["backbone"]["total"] > 0
    assert full.trainable == full.full_tuning and full.frozen == 0
    assert head.groups["backbone"]["trainable"] == 0 and head.groups["head"] == full.groups["head"]
    assert spm.groups["backbone"] == head.groups["backbone"]
    cfg = load_recipe(SMOKE)
    import torch

    from segprompt.models import BACKBONES

    spec = dict(cfg.model.backbone)
    with torch.device("meta"):
        slots = BACKBONES[spec.pop("name")](**spec).slot_channels
    expect = sum(spm_param_count(slots[s - 1], 6, channels=32) for s in (2, 4))
    assert spm.groups["prompt"] == {"total": expect, "trainable": expect}
    assert spm.full_tuning == full.full_tuning  # % of full tuning is against the original network


def test_paper_convention_leaves_out_batchnorm():
    every = breakdown(load_recipe(SMOKE), 6, "all")
    no_bn = breakdown(load_recipe(SMOKE), 6, "paper")
    import torch

    from segprompt.engine.params import build_counted

    model, _ = build_counted(load_recipe(SMOKE), 6)
    bn = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert every.trainable - no_bn.trainable == bn > 0


def test_count_params_cli_json(tmp_path):
    res = run_cli("count-params", str(SMOKE), "--set", "tuning.name=head", "--num-classes", "6", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["groups"]["backbone"]["trainable"] == 0 and out["convention"] == "paper"
    assert 0 < out["percent_of_full"] < 100
