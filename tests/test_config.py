"""Recipes: inheritance, overrides, and the message of every validation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import recipe_from_dict

from segprompt.config import (
    dump_recipe,
    load_recipe,
    resolve_recipe,
    shipped_name,
    shipped_recipes,
)
from segprompt.errors import SegpromptError
from segprompt.experiments.tables import all_tables


def _w(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def test_base_inheritance_and_list_of_bases(tmp_path):
    _w(tmp_path / "a.yaml", {"optimizer": {"lr": 0.1, "momentum": 0.8}, "schedule": {"iters": 100}})
    _w(tmp_path / "b.yaml", {"optimizer": {"lr": 0.2}, "data": {"batch_size": 4}})
    (tmp_path / "sub").mkdir()
    child = _w(tmp_path / "sub" / "c.yaml", {"base": ["../a.yaml", "../b.yaml"], "schedule": {"iters": 7}})
    r = load_recipe(child)
    assert r.optimizer.lr == 0.2  # later base wins
    assert r.optimizer.momentum == 0.8  # merged key by key
    assert r.data.batch_size == 4
    assert r.schedule.iters == 7  # the recipe wins over its bases
    single = _w(tmp_path / "d.yaml", {"base": "a.yaml"})
    assert load_recipe(single).optimizer.lr == 0.1


def test_component_name_change_replaces_instead_of_merging(tmp_path):
    _w(tmp_path / "a.yaml", {"model": {"decode_head": {"name": "fcn", "channels": 8, "num_convs": 3}}})
    _w(tmp_path / "b.yaml", {"base": "a.yaml", "model": {"decode_head": {"channels": 4}}})
    head = load_recipe(tmp_path / "b.yaml").model.decode_head
    assert head["channels"] == 4 and head["num_convs"] == 3
    _w(tmp_path / "c.yaml", {"base": "a.yaml", "tuning": {"name": "head", "bn_eval": False}})
    _w(tmp_path / "d.yaml", {"base": "c.yaml", "tuning": {"name": "full"}})
    assert load_recipe(tmp_path / "d.yaml").tuning == {"name": "full"}


def test_overrides_are_yaml_scalars(tmp_path):
    p = _w(tmp_path / "r.yaml", {"model": {"aux_heads": [{"name": "fcn", "in_index": 2}]}})
    r = load_recipe(p, ["optimizer.lr=2e-3", "runtime.deterministic=true", "data.train.crop_size=[32, 48]",
                        "model.pretrained=null", "model.aux_heads.0.loss_weight=0.25", "optimizer.name=adamw"])
    assert r.optimizer.lr == 0.002 and isinstance(r.optimizer.lr, float)
    assert r.runtime.deterministic is True
    assert r.data.train.crop_size == (32, 48)
    assert r.model.aux_heads[0]["loss_weight"] == 0.25
    assert r.optimizer.name == "adamw"
    # int where a float is expected is accepted and converted
    assert load_recipe(p, ["optimizer.lr=1"]).optimizer.lr == 1.0


def test_unknown_key_names_file_key_and_closest(tmp_path):
    _w(tmp_path / "base.yaml", {"optimizer": {"lrr": 0.1}})
    p = _w(tmp_path / "r.yaml", {"base": "base.yaml", "schedule": {"iters": 5}})
    with pytest.raises(SegpromptError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str((tmp_path / "base.yaml").resolve()) in msg  # the file that set the key, not the child
    assert "'optimizer.lrr'" in msg and "did you mean 'optimizer.lr'" in msg


def test_unknown_key_from_override_names_the_override(tmp_path):
    p = _w(tmp_path / "r.yaml", {})
    with pytest.raises(SegpromptError, match=r"--set schedule.iter=5: unknown key 'schedule.iter'; did you mean 'schedule.iters'"):
        load_recipe(p, ["schedule.iter=5"])


def test_unknown_section(tmp_path):
    p = _w(tmp_path / "r.yaml", {"optimiser": {"lr": 0.1}})
    with pytest.raises(SegpromptError, match=r"unknown key 'optimiser'; did you mean 'optimizer'"):
        load_recipe(p)


@pytest.mark.parametrize("override,expected", [
    ("schedule.iters=ten", r"'schedule.iters' must be int, got 'ten'"),
    ("optimizer.lr=true", r"'optimizer.lr' must be float, got True"),
    ("runtime.deterministic=1", r"'runtime.deterministic' must be bool"),
    ("data.train.crop_size=[1, 2, 3]", r"'data.train.crop_size' must be a list of 2 \(int >= 1, int >= 1\), got \[1, 2, 3\]"),
    ("runtime.amp=fp8", r"'runtime.amp' must be one of 'off', 'fp16', 'bf16', got 'fp8'"),
    ("data.mean=3", r"'data.mean' must be a list of 3"),
    ("optimizer=5", r"'optimizer' must be a mapping"),
])
def test_wrong_type_names_key_and_expected_type(tmp_path, override, expected):
    p = _w(tmp_path / "r.yaml", {})
    with pytest.raises(SegpromptError, match=expected):
        load_recipe(p, [override])


def test_component_validation(tmp_path):
    p = _w(tmp_path / "r.yaml", {})
    with pytest.raises(SegpromptError, match=r"'model.backbone.name' is 'resnt', not one of: resnet, stdc, timm, vit; did you mean 'resnet'"):
        load_recipe(p, ["model.backbone.name=resnt"])
    with pytest.raises(SegpromptError, match=r"unknown key 'model.decode_head.chanels' for head 'fcn'; did you mean 'model.decode_head.channels'"):
        load_recipe(p, ["model.decode_head.chanels=3"])
    with pytest.raises(SegpromptError, match=r"'model.backbone.depth' must be int"):
        load_recipe(p, ["model.backbone.depth=deep"])
    # arguments the builder supplies itself cannot be set from a recipe
    with pytest.raises(SegpromptError, match=r"unknown key 'model.decode_head.num_classes'"):
        load_recipe(p, ["model.decode_head.num_classes=3"])
    with pytest.raises(SegpromptError, match=r"'tuning' must be a mapping with 'name'"):
        load_recipe(p, ["tuning=full"])


def test_required_param_group_pattern(tmp_path):
    p = _w(tmp_path / "r.yaml", {"optimizer": {"param_groups": [{"lr_mult": 10}]}})
    with pytest.raises(SegpromptError, match=r"'optimizer.param_groups.0.pattern' is required"):
        load_recipe(p)


def test_bad_override_syntax_and_list_index(tmp_path):
    p = _w(tmp_path / "r.yaml", {})
    with pytest.raises(SegpromptError, match="expected KEY.PATH=VALUE"):
        load_recipe(p, ["optimizer.lr"])
    with pytest.raises(SegpromptError, match=r"indexes a list of 0 items"):
        load_recipe(p, ["model.aux_heads.0.loss_weight=1"])


def test_inheritance_loop_and_missing_base(tmp_path):
    _w(tmp_path / "a.yaml", {"base": "b.yaml"})
    _w(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(SegpromptError, match="recipe inheritance loops"):
        load_recipe(tmp_path / "a.yaml")
    _w(tmp_path / "c.yaml", {"base": "nope.yaml"})
    with pytest.raises(SegpromptError, match=r"recipe '.*nope.yaml' does not exist"):
        load_recipe(tmp_path / "c.yaml")


def test_not_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optimizer: {lr: [\n")
    with pytest.raises(SegpromptError, match="is not valid YAML"):
        load_recipe(p)


def test_resolved_config_round_trips(tmp_path):
    p = _w(tmp_path / "r.yaml", {"optimizer": {"param_groups": [{"pattern": "backbone", "lr_mult": 0.1}]}})
    r = load_recipe(p, ["evaluation.crop_size=[32, 32]"])
    again = recipe_from_dict(yaml.safe_load(dump_recipe(r)), tmp_path)
    assert again == r


def test_yaml_12_floats_in_recipes(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optimizer: {lr: 1e-4, weight_decay: 5e-4}\n")
    assert load_recipe(p).optimizer.lr == 1e-4


def test_shipped_recipes_validate():
    root = shipped_recipes()
    # table definitions are validated by tests/test_params.py
    paths = sorted(p for p in root.rglob("*.yaml") if "tables" not in p.relative_to(root).parts)
    names = {shipped_name(p).removesuffix(".yaml") for p in paths}
    table1, = (t for t in all_tables() if t.id == "spm_table1")
    table1_recipes = {shipped_name(table1.cell(r, c)[0]).removesuffix(".yaml")
                      for r in table1.rows for c in table1.columns if c.kind == "metric"}
    assert len(paths) > 100 and "smoke" in names
    assert "spm/ade20k_r101_spm" in table1_recipes and table1_recipes <= names  # every Table 1 recipe ships
    for path in paths:
        load_recipe(path)


def test_recipe_names_resolve_to_shipped_recipes(tmp_path, monkeypatch):
    root = shipped_recipes()
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    for name in ("smoke", "smoke.yaml", "recipes/smoke.yaml"):  # .yaml optional, a leading recipes/ dropped
        assert resolve_recipe(name) == root / "smoke.yaml"
    assert resolve_recipe("spm/ade20k_r101_spm") == root / "spm" / "ade20k_r101_spm.yaml"
    shipped = load_recipe("smoke")
    assert shipped == load_recipe(root / "smoke.yaml") and shipped.schedule.iters == 40
    # an existing file is that file, even where a shipped recipe has the same name
    _w(tmp_path / "smoke.yaml", {"schedule": {"iters": 3}})
    assert resolve_recipe("smoke.yaml") == Path("smoke.yaml") and load_recipe("smoke.yaml").schedule.iters == 3
    assert load_recipe("smoke").schedule.iters == 40  # no file called 'smoke': the shipped one
    with pytest.raises(SegpromptError, match=r"recipe 'smok' does not exist.*Did you mean 'smoke'\? Give a recipe file"):
        load_recipe("smok")
    with pytest.raises(SegpromptError, match="is a directory; pass a YAML recipe file"):
        load_recipe(tmp_path)


def test_base_chains_resolve_among_shipped_recipes_and_from_a_users_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # shipped chain: spm/ade20k_r101_spm_r1 -> ade20k_r101_spm.yaml -> ../_base/{models,datasets,...}
    r1 = load_recipe("spm/ade20k_r101_spm_r1")
    assert r1.tuning["name"] == "spm" and r1.tuning["recurrent"] == 1  # r1's own key over its base's 3
    assert r1.data.dataset == "ade20k" and r1.data.num_classes == 150  # from _base/datasets/ade20k.yaml
    assert r1.model.decode_head["name"] == "psp"  # from _base/models/psp_r101-d8.yaml
    # a user's recipe elsewhere builds on a shipped one by name
    (tmp_path / "mine").mkdir()
    mine = _w(tmp_path / "mine" / "r.yaml", {"base": "spm/ade20k_r101_spm", "tuning": {"recurrent": 2},
                                              "data": {"root": "/datasets/ade20k"}})
    r = load_recipe(mine)
    assert r.tuning["recurrent"] == 2 and r.tuning["stages"] == [1, 2, 3, 4, 5] and r.data.root == "/datasets/ade20k"
    # ... and a file next to it wins over a shipped recipe of the same name
    _w(tmp_path / "mine" / "smoke.yaml", {"schedule": {"iters": 5}})
    assert load_recipe(_w(tmp_path / "mine" / "s.yaml", {"base": "smoke.yaml"})).schedule.iters == 5
    bad = _w(tmp_path / "mine" / "bad.yaml", {"base": "spm/ade20k_r101_spn"})
    with pytest.raises(SegpromptError, match=r"bad.yaml: base 'spm/ade20k_r101_spn'.*Did you mean 'spm/ade20k_r101_spm'"):
        load_recipe(bad)
