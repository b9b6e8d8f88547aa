"""One loader (docs/api.md): runs that travel (another folder, a copy elsewhere without the dataset),
frozen weights found by SHA-256 (--weights), deltas that round-trip byte for byte, a trained run
started on new classes (--load-from-partial, model.pretrained = a checkpoint), and the Python API."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE, run_cli

import segprompt
from segprompt.data.synthetic import generate_synthetic
from segprompt.errors import SegpromptError
from segprompt.evaluation.evaluate import evaluate_checkpoint
from segprompt.runs.delta import read_delta
from segprompt.serve.predict import predict
from segprompt.serve.share import export_delta
from segprompt.training.launch import train


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, synthetic_root):
    """A user's folder: ``data/`` (the dataset), ``pretrained/backbone.pth`` (frozen weights), and an
    SPM run trained from there with relative paths in its recipe. Returns (folder, run, images)."""
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(synthetic_root, ws / "data")
    d = {**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "root": "data"}, "model": {**TINY_RECIPE["model"],
         "pretrained": "pretrained/backbone.pth"}, "tuning": {"name": "spm", "channels": 8, "recurrent": 1}}
    d["schedule"] = {"iters": 3, "warmup_iters": 1}
    (ws / "recipe.yaml").write_text(yaml.safe_dump(d))
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        from segprompt.config import load_recipe
        from segprompt.models import BACKBONES

        spec = dict(load_recipe("recipe.yaml").model.backbone)
        torch.manual_seed(5)
        (ws / "pretrained").mkdir()
        torch.save({"state_dict": BACKBONES[spec.pop("name")](**spec).state_dict()}, ws / "pretrained" / "backbone.pth")
        run = train("recipe.yaml", [], out="runs/spm")
    finally:
        os.chdir(cwd)
    images = ws / "images"
    shutil.copytree(ws / "data" / "img_dir" / "val", images)
    return ws, (ws / run).resolve(), images


def test_a_run_works_from_another_folder_and_copied_elsewhere(workspace, tmp_path, monkeypatch):
    ws, run, images = workspace
    monkeypatch.chdir(ws)
    predict(run, [images], tmp_path / "here", show_progress=False)
    expected = _files(tmp_path / "here")

    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)  # relative data.root and model.pretrained resolve where training ran
    predict(run, [images], tmp_path / "there", show_progress=False)
    assert _files(tmp_path / "there") == expected
    written, metrics = evaluate_checkpoint(run)
    assert metrics["images"] == 7 and written == run / "eval.json"
    written, test = evaluate_checkpoint(run, split="test")  # beside the val result, which stays
    assert written == run / "eval_test.json" and test["split"] == "test"
    assert json.loads((run / "eval.json").read_text())["split"] == "val"

    copy = tmp_path / "elsewhere" / "spm"
    shutil.copytree(run, copy)
    _, again = evaluate_checkpoint(copy, checkpoint=str(copy / "checkpoints" / "best.pt"))  # eval --checkpoint PATH
    assert again["mIoU"] == metrics["mIoU"] and any((copy / "eval_history").iterdir())  # the copied eval.json was kept
    moved = tmp_path / "weights" / "b.pth"
    moved.parent.mkdir()
    (ws / "pretrained" / "backbone.pth").rename(moved)
    (ws / "data").rename(ws / "data-away")  # no dataset: predict needs none
    try:
        with pytest.raises(SegpromptError, match=r"frozen weights \(sha256 [0-9a-f]{64}\).*--weights PATH"):
            predict(copy, [images], tmp_path / "x", show_progress=False)
        predict(copy, [images], tmp_path / "copy", weights=moved, show_progress=False)
        assert _files(tmp_path / "copy") == expected
        model = segprompt.load(copy, weights=moved)
        assert model.classes == json.loads((ws / "data-away" / "meta.json").read_text())["classes"]
        first = sorted(images.iterdir())[0]
        from segprompt.data.dataset import read_image

        one, both = model.predict(first), model.predict([first, read_image(first)])
        assert one.shape == read_image(first).shape[:2] and all(np.array_equal(one, b) for b in both)
        with pytest.raises(SegpromptError, match="has sha256 .* pass the file this run was trained on"):
            segprompt.load(copy, weights=ws / "recipe.yaml")
    finally:
        moved.rename(ws / "pretrained" / "backbone.pth")
        (ws / "data-away").rename(ws / "data")


def test_delta_round_trip_is_byte_identical(workspace, tmp_path, monkeypatch):
    ws, run, images = workspace
    monkeypatch.chdir(tmp_path)
    predict(run, [images], tmp_path / "run", show_progress=False)
    record = export_delta(run, tmp_path / "task.safetensors")
    assert record["file_bytes"] < record["full_model_bytes"] and record["tensors"] > 0
    with pytest.raises(SegpromptError, match="already exists"):
        export_delta(run, tmp_path / "task.safetensors")

    backbone = tmp_path / "bb.pth"
    shutil.copy(ws / "pretrained" / "backbone.pth", backbone)
    predict(tmp_path / "task.safetensors", [images], tmp_path / "delta", weights=backbone, show_progress=False)
    assert _files(tmp_path / "delta") == _files(tmp_path / "run")

    r = run_cli("export", str(run), "--format", "delta", "--out", str(tmp_path / "cli.safetensors"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"delta: \d+ tensors, [\d,]+ parameters, [\d.]+ MB; the whole model is [\d.]+ MB", r.stdout)
    a, b = (read_delta(tmp_path / n) for n in ("cli.safetensors", "task.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and \
        {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}

    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(SegpromptError, match="not a segprompt delta"):
        segprompt.load(tmp_path / "foreign.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "task.safetensors").read_bytes()[:100])
    with pytest.raises(SegpromptError, match="cannot be read as safetensors"):
        segprompt.load(tmp_path / "cut.safetensors")
    with pytest.raises(SegpromptError, match="is a delta already"):
        export_delta(tmp_path / "task.safetensors", tmp_path / "again.safetensors", weights=backbone)


def test_load_from_a_run_onto_new_classes(workspace, tmp_path, monkeypatch):
    ws, run, _ = workspace
    monkeypatch.chdir(ws)
    three = tmp_path / "three"
    generate_synthetic(three, seed=1, num_classes=3, image_size=(64, 64), counts={"train": 6, "val": 3, "test": 1})
    over = [f"data.root={three}", "schedule.iters=2", "evaluation.interval=2", "checkpoint.interval=2"]
    with pytest.raises(SegpromptError, match=r"tensor\(s\) of other shapes .*prior \(4, 64, 64\) vs \(3, 64, 64\).*--load-from-partial"):
        train("recipe.yaml", over, out=tmp_path / "refused", load_from=run)
    new = train("recipe.yaml", over, out=tmp_path / "new", load_from=run, load_from_partial=True)
    log = (new / "train.log").read_text()
    assert re.search(r"re-initialised\): \[.*'decode_head\.conv_seg\.weight'", log), log
    assert segprompt.load(new).classes == json.loads((three / "meta.json").read_text())["classes"]

    with pytest.raises(SegpromptError, match="stores only what its run trained"):
        train("recipe.yaml", [*over, f"model.pretrained={run / 'checkpoints' / 'best.pt'}"], out=tmp_path / "x")
    full = train("recipe.yaml", ["tuning={name: full}", "schedule.iters=1", "evaluation.interval=1",
                                 "checkpoint.interval=1"], out=tmp_path / "full")
    taken = train("recipe.yaml", [*over, "tuning={name: head}", f"model.pretrained={full / 'checkpoints' / 'last.pt'}"],
                  out=tmp_path / "taken")
    trained = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    backbone = segprompt.load(taken).model.backbone.state_dict()
    assert all(torch.equal(backbone[k.removeprefix("backbone.")], v) for k, v in trained.items()
               if k.startswith("backbone."))


def test_the_api_example_in_the_docs_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S).group(1)
    generate_synthetic(tmp_path / "data" / "synthetic", seed=0, num_classes=4, image_size=(128, 128),
                       counts={"train": 8, "val": 2, "test": 1})
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "docs/api.md", "exec"), scope)
    assert scope["label_map"].shape == (128, 128) and scope["model"].classes[0] == "background"
    assert (tmp_path / "results" / "api" / "eval.json").is_file()


def test_export_and_bench_work_on_a_copied_run_without_its_data(workspace, tmp_path, monkeypatch):
    from segprompt.measure.bench import BenchOptions, run_bench
    from segprompt.serve.export import ExportOptions, export_model

    ws, run, _ = workspace
    copy = tmp_path / "copied"
    shutil.copytree(run, copy)
    monkeypatch.chdir(tmp_path)
    (ws / "data").rename(ws / "data-away")
    try:
        record = export_model(copy, tmp_path / "m.pt", ExportOptions(format="torchscript", size=(32, 32)))
        assert record["verified"] and record["class_names"] == "checkpoint" and len(record["classes"]) == 4
        result = run_bench(copy, BenchOptions(size=(32, 32), warmup=1, calib_seconds=0.02, seconds=0.1, chunks=2,
                                              device="cpu"))
        assert result["num_classes"] == 4 and result["class_names"] == "checkpoint" and result["fps"] > 0
    finally:
        (ws / "data-away").rename(ws / "data")


def test_a_lora_run_exports_a_plain_whole_checkpoint(workspace, tmp_path, monkeypatch):
    from segprompt.serve.share import export_checkpoint

    ws, _, _ = workspace
    monkeypatch.chdir(ws)
    short = ["schedule.iters=2", "evaluation.interval=2", "checkpoint.interval=2"]
    lora = train("recipe.yaml", ["tuning={name: lora, rank: 2, target: layer4}", *short], out=tmp_path / "lora")
    record = export_checkpoint(lora, tmp_path / "merged.pt")
    assert record["lora_merged"] > 0
    state = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert state["full_model"] and state["config"]["tuning"] == {"name": "full"}
    assert not any(".lora_" in k or ".base_layer." in k for k in state["model"])
    a, b = segprompt.load(lora), segprompt.load(tmp_path / "merged.pt")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(a.model(x), b.model(x), atol=1e-5)
    # the plain network is another recipe's pretrained backbone
    head = train("recipe.yaml", ["tuning={name: head}", f"model.pretrained={tmp_path / 'merged.pt'}", *short],
                 out=tmp_path / "head")
    got = segprompt.load(head).model.backbone.state_dict()
    assert all(torch.equal(got[k.removeprefix("backbone.")], v) for k, v in state["model"].items()
               if k.startswith("backbone."))
    with pytest.raises(SegpromptError, match="a whole checkpoint is a .pt or .pth file"):
        export_checkpoint(lora, tmp_path / "merged.onnx")


def test_predict_tasks_serves_deltas_on_one_backbone_file(workspace, tmp_path, monkeypatch):
    from segprompt.serve.predict import predict_tasks

    ws, spm, images = workspace
    monkeypatch.chdir(ws)
    head = train("recipe.yaml", ["tuning={name: head}", "schedule.iters=2", "evaluation.interval=2",
                                 "checkpoint.interval=2"], out=tmp_path / "head")
    for name, run in (("spm", spm), ("head", head)):
        export_delta(run, tmp_path / f"{name}.safetensors")
        predict(run, [images], tmp_path / "alone" / name, show_progress=False)
    backbone = tmp_path / "bb.pth"
    shutil.copy(ws / "pretrained" / "backbone.pth", backbone)
    monkeypatch.chdir(tmp_path)
    tasks = [f"spm={tmp_path / 'spm.safetensors'},head={tmp_path / 'head.safetensors'}"]
    result = predict_tasks(tasks, [str(images)], tmp_path / "served", weights=backbone, show_progress=False)
    assert result.tasks == ["spm", "head"]
    for name in ("spm", "head"):
        assert _files(tmp_path / "served" / name) == _files(tmp_path / "alone" / name)
