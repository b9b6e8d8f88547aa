"""End-to-end training runs: run directory, checkpoints, evaluation, --load-from and resume rules."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import write_recipe

from segprompt.config import load_recipe
from segprompt.errors import SegpromptError
from segprompt.evaluation.evaluate import evaluate_checkpoint
from segprompt.io import sha256_file
from segprompt.training.launch import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("run")
    recipe = write_recipe(tmp / "tiny.yaml", synthetic_root)
    return train(recipe, ["schedule.iters=6"], out=tmp / "run"), recipe


def test_run_directory_contents(trained_run):
    run, recipe = trained_run
    assert load_recipe(run / "config.yaml") == load_recipe(recipe, ["schedule.iters=6"])
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["seed"] == 0 and env["torch"] == torch.__version__
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if "mIoU" in r]
    assert [r["iter"] for r in evals] == [3, 6]
    assert (run / "train.log").read_text().count("iter 6/6") == 1
    for name in ("last.pt", "best.pt"):
        assert (run / "checkpoints" / name).is_file()
    final = json.loads((run / "eval.json").read_text())
    assert final["iter"] == 6 and len(final["per_class"]) == 4 and final["images"] == 7
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["best"]["value"] == max(r["mIoU"] for r in evals)


def test_existing_run_directory_is_never_overwritten(trained_run):
    run, recipe = trained_run
    before = sha256_file(run / "checkpoints" / "last.pt")
    with pytest.raises(SegpromptError, match="already exists and is not empty"):
        train(recipe, ["schedule.iters=6"], out=run)
    assert sha256_file(run / "checkpoints" / "last.pt") == before


def test_resume_with_a_different_recipe_is_refused(trained_run):
    run, recipe = trained_run
    with pytest.raises(SegpromptError, match=r"recipe differs .*run vs now: .*optimizer.lr: 0.02 vs 0.5"):
        train(recipe, ["schedule.iters=6", "optimizer.lr=0.5"], out=run, resume="auto")


def test_resume_of_finished_run_is_a_no_op(trained_run):
    run, recipe = trained_run
    before = sha256_file(run / "checkpoints" / "last.pt")
    train(recipe, ["schedule.iters=6"], out=run, resume=str(run / "checkpoints" / "last.pt"))
    assert sha256_file(run / "checkpoints" / "last.pt") == before


def test_eval_writes_json_keeps_history_and_saves_predictions(trained_run, tmp_path):
    run, _ = trained_run
    first = json.loads((run / "eval.json").read_text())
    preds = tmp_path / "preds"
    _, res = evaluate_checkpoint(run, checkpoint="last", save_preds=preds)
    assert res["mIoU"] == pytest.approx(first["mIoU"])  # same weights, same numbers
    assert len(list((run / "eval_history").iterdir())) >= 1  # the earlier eval.json was kept
    index = sorted(preds.glob("*[0-9].png"))
    overlays = sorted(preds.glob("*_overlay.png"))
    assert len(index) == len(overlays) == 7
    import cv2

    pred = cv2.imread(str(index[0]), cv2.IMREAD_UNCHANGED)
    assert pred.ndim == 2 and pred.max() < 4
    _, slide = evaluate_checkpoint(run, checkpoint="last", mode="slide",
                                   overrides=["evaluation.crop_size=[32,32]", "evaluation.stride=[24,24]"])
    assert slide["mode"] == "slide" and slide["images"] == 7
    with pytest.raises(SegpromptError, match="is not empty"):
        evaluate_checkpoint(run, checkpoint="last", save_preds=preds)


def _random_backbone_file(path, recipe):
    from segprompt.models import BACKBONES

    spec = dict(load_recipe(recipe).model.backbone)
    torch.manual_seed(123)
    bb = BACKBONES[spec.pop("name")](**spec)
    for m in bb.modules():  # non-trivial statistics, so "unchanged" is a real check
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"state_dict": bb.state_dict()}, path)
    return bb.state_dict()


def test_head_tuning_stores_only_what_training_changed(tmp_path, synthetic_root):
    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    weights = tmp_path / "backbone.pth"
    original = _random_backbone_file(weights, recipe)
    over = [f"model.pretrained={weights}", "tuning.name=head", "schedule.iters=4"]
    run = train(recipe, over, out=tmp_path / "run")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"] and not any(k.startswith("backbone.") for k in state["model"])
    assert any(k.startswith("decode_head.") for k in state["model"])
    assert state["frozen_source"] == {"type": "file", "path": str(weights.resolve()), "sha256": sha256_file(weights)}
    assert not any(k.startswith("backbone.") for s in state["optimizer"]["state"].values() for k in s) and \
        sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(
            [k for k in state["model"] if "running" not in k and "num_batches" not in k])

    # the frozen backbone (weights and BN statistics) is bit-for-bit the file's after training
    from segprompt.build import build_model, dataset_meta

    cfg = load_recipe(run / "config.yaml")
    model = build_model(cfg, dataset_meta(cfg))
    model.load_state_dict(state["model"], strict=False)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, original[k]), k

    _, res = evaluate_checkpoint(run, checkpoint="last")
    assert res["images"] == 7
    torch.save({"state_dict": {k: v + 1 for k, v in original.items()}}, weights)
    with pytest.raises(SegpromptError, match="trained on frozen weights with sha256"):
        evaluate_checkpoint(run, checkpoint="last")
    weights.unlink()
    with pytest.raises(SegpromptError, match="Put that file back there"):
        evaluate_checkpoint(run, checkpoint="last")


def test_full_model_option_and_load_from(tmp_path, synthetic_root):
    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    run = train(recipe, ["schedule.iters=2", "checkpoint.save_full_model=true"], out=tmp_path / "a")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    from segprompt.build import build_model, dataset_meta

    cfg = load_recipe(run / "config.yaml")
    assert set(state["model"]) == set(build_model(cfg, dataset_meta(cfg)).state_dict())

    # --load-from: weights come from the checkpoint, the iteration counter starts at 0
    run2 = train(recipe, ["schedule.iters=1", "optimizer.lr=0.0", "schedule.min_lr=0.0"], out=tmp_path / "b",
                 load_from=run / "checkpoints" / "last.pt")
    s2 = torch.load(run2 / "checkpoints" / "last.pt", weights_only=True)
    assert s2["iteration"] == 1
    w = "decode_head.conv_seg.weight"
    assert torch.equal(s2["model"][w], state["model"][w])


def test_print_config_cli(recipe):
    from typer.testing import CliRunner

    from segprompt.cli import app

    res = CliRunner().invoke(app, ["train", str(recipe), "--print-config", "--set", "optimizer.lr=0.3"])
    assert res.exit_code == 0, res.output
    printed = yaml.safe_load(res.output)
    assert printed["optimizer"]["lr"] == 0.3 and printed["schedule"]["iters"] == 6


def test_amp_accumulation_clipping_adamw_run(tmp_path, synthetic_root):
    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    run = train(recipe, ["runtime.amp=bf16", "optimizer.accum_steps=2", "optimizer.grad_clip=1.0",
                         "optimizer.name=adamw", "optimizer.lr=1e-3", "optimizer.weight_decay=0.01",
                         "schedule.iters=4", "evaluation.interval=0"], out=tmp_path / "run")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 4
    assert all(s["step"] == 4 for s in state["optimizer"]["state"].values())  # one step per 2 micro-batches
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
    with pytest.raises(SegpromptError, match="data.batch_size 4 .* not divisible by world size 1 x optimizer.accum_steps 3"):
        train(recipe, ["optimizer.accum_steps=3"], out=tmp_path / "bad")


def test_default_run_dir_and_resume_auto_finds_latest_run(tmp_path, synthetic_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "exp.yaml", synthetic_root)
    run = train(recipe, ["schedule.iters=2"])
    assert run.parent == tmp_path.joinpath("results", "exp").relative_to(tmp_path)
    before = sha256_file(run / "checkpoints" / "last.pt")
    assert train(recipe, ["schedule.iters=2"], resume="auto") == run
    assert sha256_file(run / "checkpoints" / "last.pt") == before


def test_one_shot_training_subset(tmp_path, synthetic_root):
    from segprompt.build import build_train_dataset, dataset_meta

    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    picks = set()
    for seed in range(5):
        cfg = load_recipe(recipe, ["data.train_subset=1", f"data.subset_seed={seed}"])
        ds = build_train_dataset(cfg, dataset_meta(cfg))
        assert len(ds) == 1 and ds.labels[0].stem == ds.images[0].stem
        picks.add(ds.images[0].name)
    assert len(picks) > 1  # different seeds, different images
    run = train(recipe, ["data.train_subset=1", "schedule.iters=2"], out=tmp_path / "run")  # batch 4 from 1 image
    assert (run / "checkpoints" / "last.pt").is_file()
    with pytest.raises(SegpromptError, match=r"data.train_subset 99 is not in 1..12"):
        train(recipe, ["data.train_subset=99"], out=tmp_path / "bad")
