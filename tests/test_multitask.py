"""Many tasks on one frozen backbone (segprompt.serve.multitask, docs/multitask.md): each task's
output is exactly its own run's, in mixed batches too; the frozen backbone is held once; runs on
other frozen weights, and checkpoints that cannot share, are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_recipe

from segprompt.build import build_eval_dataset, build_model, dataset_meta
from segprompt.cli import main
from segprompt.config import dump_recipe, load_recipe
from segprompt.data.dataset import read_image
from segprompt.data.synthetic import generate_synthetic
from segprompt.data.transforms import normalize
from segprompt.errors import SegpromptError
from segprompt.io import atomic_write_text
from segprompt.models import BACKBONES
from segprompt.runs import checkpoint as ck
from segprompt.serve.multitask import MultiTaskModel, load_run_model, task_names
from segprompt.serve.predict import predict
from segprompt.training.launch import train

TUNINGS = {
    "head": {"name": "head"},
    "spm": {"name": "spm", "channels": 16, "stages": [2, 3]},
    "adapter": {"name": "adapter", "channels": 8, "groups": 4},
    "lora": {"name": "lora", "rank": 2},
    "bias": {"name": "bias"},
    "bn_free": {"name": "head", "bn_eval": False},  # BatchNorm statistics trained: per-task copies
    "full": {"name": "full"},
}


def backbone_file(path, recipe, seed=123):
    """A random backbone with non-trivial BatchNorm statistics, saved as a pretrained file."""
    spec = dict(load_recipe(recipe).model.backbone)
    torch.manual_seed(seed)
    bb = BACKBONES[spec.pop("name")](**spec)
    for m in bb.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1000)
    torch.save({"state_dict": bb.state_dict()}, path)
    return bb.state_dict()


def fake_run(folder, name, root, tuning, over=(), *, init=None, full_model=False, **sections):
    """A run directory as `segprompt train` writes it (config.yaml, checkpoints/best.pt through the
    engine's save path), its trainable tensors moved off their initial values (a trained delta)."""
    cfg = load_recipe(write_recipe(folder / f"{name}.yaml", root, tuning=tuning, **sections), list(over))
    model = build_model(cfg, dataset_meta(cfg))
    if init is not None:
        ck.load_init(model, init, partial=True)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    run = folder / name
    (run / "checkpoints").mkdir(parents=True)
    atomic_write_text(run / "config.yaml", dump_recipe(cfg))
    frozen = any(not p.requires_grad for p in model.parameters())
    ck.save_checkpoint(run / "checkpoints" / "best.pt", model=ck.model_state(model, full_model), full_model=full_model,
                       frozen_source=ck.frozen_source(cfg.model.pretrained if frozen else None, cfg.runtime.seed,
                                                      init if frozen else None),
                       iteration=1, config=cfg.to_dict())
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_root):
    """A private copy of the dataset: building an SPM run caches its class prior in the dataset's folder."""
    root = tmp_path_factory.mktemp("multitask_data") / "synthetic"
    shutil.copytree(synthetic_root, root)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("multitask")
    weights = tmp / "backbone.pth"
    original = backbone_file(weights, write_recipe(tmp / "r.yaml", data))
    three = tmp / "three"  # a second dataset, with another number of classes
    generate_synthetic(three, seed=1, num_classes=3, image_size=(48, 48), counts={"train": 4, "val": 2, "test": 1})
    pre = [f"model.pretrained={weights}"]
    runs = {name: fake_run(tmp, name, data, t, pre) for name, t in TUNINGS.items()}
    runs["head_k3"] = fake_run(tmp, "head_k3", three, TUNINGS["head"], pre)
    runs["head_seed1"] = fake_run(tmp, "head_seed1", data, TUNINGS["head"], [*pre, "runtime.seed=1"])
    # one run really trained (2 iterations), not written by fake_run
    recipe = write_recipe(tmp / "trained.yaml", data, tuning=TUNINGS["adapter"])
    runs["trained"] = train(recipe, [*pre, "schedule.iters=2", "evaluation.interval=2", "checkpoint.interval=2"],
                            out=tmp / "trained")
    return tmp, weights, original, runs


def test_mixed_batch_equals_each_runs_own_model(world):
    tmp, weights, original, runs = world
    mt = MultiTaskModel.from_runs(runs)
    assert mt.tasks == list(runs)
    torch.manual_seed(0)
    x = torch.randn(len(runs) + 3, 3, 32, 32)
    names = [mt.tasks[(3 * i) % len(runs)] for i in range(len(x))]  # interleaved, uneven groups
    out = mt(x, names)
    for name, run in runs.items():
        idx = [i for i, n in enumerate(names) if n == name]
        assert idx, name
        with torch.no_grad():
            ref = load_run_model(run)(x[idx])
        assert ref.shape[1] == mt.task(name).num_classes
        for j, i in enumerate(idx):
            assert torch.equal(out[i], ref[j]), name
    assert out[names.index("head_k3")].shape == (3, 32, 32)

    # images of several sizes in one call: grouped by task and size
    sizes = [torch.randn(3, 32, 32), torch.randn(3, 40, 24), torch.randn(3, 32, 32), torch.randn(3, 40, 24)]
    tasks = ["lora", "lora", "spm", "lora"]
    out = mt(sizes, tasks)
    lora, spm = load_run_model(runs["lora"]), load_run_model(runs["spm"])
    with torch.no_grad():
        assert torch.equal(out[0], lora(sizes[0][None])[0]) and torch.equal(out[2], spm(sizes[2][None])[0])
        big = lora(torch.stack([sizes[1], sizes[3]]))
    assert torch.equal(out[1], big[0]) and torch.equal(out[3], big[1]) and out[1].shape == (4, 40, 24)

    # a task switch is another tree over the same storage; the frozen BatchNorm statistics did not move
    head, spm_model, bias = (mt.model(n).backbone for n in ("head", "spm", "bias"))
    assert head.stem[0].weight.data_ptr() == spm_model.stem[0].weight.data_ptr()
    assert head.layer1[0].bn1.bias.data_ptr() != bias.layer1[0].bn1.bias.data_ptr()
    assert not mt.model("head").training and not head.layer1[0].bn1.training
    with pytest.raises(SegpromptError, match="task 'head' of a MultiTaskModel is for inference only"):
        mt.model("head").train()
    assert mt.model("head").eval() is mt.model("head")
    for k, v in head.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_backbone_is_held_once_and_changed_frozen_tensors_per_task(world):
    _, _, original, runs = world
    mt = MultiTaskModel.from_runs({n: runs[n] for n in ("head", "spm", "adapter", "lora", "bias", "bn_free")})
    backbone_bytes = sum(v.untyped_storage().nbytes() for v in original.values())
    fp = mt.footprint()
    deltas = {n: sum(v.untyped_storage().nbytes() for v in ck.load_run_checkpoint(
        runs[n] / "checkpoints" / "best.pt")["model"].values()) for n in mt.tasks}
    assert fp["tasks"] == deltas  # each task holds exactly its checkpoint's tensors
    assert fp["shared"] == backbone_bytes  # and the frozen backbone exists once
    assert mt.task("head").own_frozen == [] and mt.task("head").shares_backbone
    assert mt.task("bias").own_frozen == sorted(k.removeprefix("backbone.") for k in ck.load_run_checkpoint(
        runs["bias"] / "checkpoints" / "best.pt")["model"] if k.startswith("backbone."))
    assert any(k.endswith("running_var") for k in mt.task("bn_free").own_frozen)


def test_full_tuning_and_other_seeds_join_without_a_new_backbone(world):
    _, _, original, runs = world
    mt = MultiTaskModel.from_runs({n: runs[n] for n in ("head", "head_seed1", "full")})
    assert not mt.task("full").shares_backbone  # it keeps every tensor itself (frozen_source: seed)
    fp = mt.footprint()
    assert fp["shared"] == sum(v.untyped_storage().nbytes() for v in original.values())
    assert fp["tasks"]["head_seed1"] == fp["tasks"]["head"]  # the second seed's backbone was deduplicated


def test_vit_prompts_and_adapters_share_a_seeded_backbone(tmp_path, data):
    model = {"backbone": {"name": "vit", "img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2,
                          "num_heads": 2, "out_indices": [0, 1], "num_stages": 2},
             "decode_head": {"name": "fcn", "channels": 8, "num_convs": 1}, "aux_heads": []}
    tunings = {"vpt": {"name": "vpt", "num_tokens": 2}, "vpt_bias": {"name": "vpt", "num_tokens": 2, "bias": True},
               "adaptformer": {"name": "adaptformer", "bottleneck": 4, "dropout": 0.0},
               "spm": {"name": "spm", "channels": 16, "stages": [1, 2]}}
    runs = {}
    for name, tuning in tunings.items():  # no pretrained file: the frozen weights are the seed's
        runs[name] = fake_run(tmp_path, name, data, tuning, ["runtime.seed=3"], model=model)
    mt = MultiTaskModel.from_runs(runs)
    x = torch.randn(6, 3, 32, 32)
    names = ["vpt", "spm", "adaptformer", "vpt_bias", "spm", "vpt"]
    out = mt(x, names)
    for name, run in runs.items():
        idx = [i for i, n in enumerate(names) if n == name]
        with torch.no_grad():
            ref = load_run_model(run)(x[idx])
        assert all(torch.equal(out[i], ref[j]) for j, i in enumerate(idx)), name
    assert mt.task("adaptformer").own_frozen == [] and mt.task("vpt").own_frozen == []
    assert mt.task("vpt_bias").own_frozen and all(k.endswith("bias") for k in mt.task("vpt_bias").own_frozen)
    fc1 = [mt.model(n).backbone.blocks[0].mlp.fc1.weight.data_ptr() for n in ("vpt", "adaptformer", "spm")]
    assert fc1[0] == fc1[1] == fc1[2]


def test_refuses_runs_on_other_frozen_weights(world, data):
    tmp, weights, _, runs = world
    other = tmp / "other.pth"
    backbone_file(other, write_recipe(tmp / "r2.yaml", data), seed=7)
    foreign = fake_run(tmp, "foreign", data, TUNINGS["head"], [f"model.pretrained={other}"])
    with pytest.raises(SegpromptError, match=r"task 'foreign' was not trained on the same frozen backbone as task "
                                             r"'head' \(frozen weights file sha256"):
        MultiTaskModel.from_runs({"head": runs["head"], "foreign": foreign})
    wide = fake_run(tmp, "wide", data, TUNINGS["head"], ["model.backbone.base_channels=16"])
    with pytest.raises(SegpromptError, match=r"task 'wide' .* \(backbone .*\"base_channels\": 16"):
        MultiTaskModel.from_runs({"head": runs["head"], "wide": wide})
    seeded = [fake_run(tmp, f"random{s}", data, TUNINGS["spm"], [f"runtime.seed={s}"]) for s in (0, 1)]
    with pytest.raises(SegpromptError, match="random initialisation with seed 1 vs random initialisation with seed 0"):
        MultiTaskModel.from_runs(seeded)


def test_refuses_checkpoints_that_cannot_share(world, data):
    tmp, weights, _, runs = world
    whole = fake_run(tmp, "whole", data, TUNINGS["head"], [f"model.pretrained={weights}"], full_model=True)
    with pytest.raises(SegpromptError, match="task 'whole': checkpoint .* stores the whole model"):
        MultiTaskModel.from_runs([runs["head"], whole])
    text = tmp / "text"
    (text / "checkpoints").mkdir(parents=True)
    cfg = load_recipe(write_recipe(tmp / "text.yaml", data, model={
        "backbone": {"name": "stdc", "text": {"clip_weights": "RN50.pt"}},
        "decode_head": {"name": "fcn", "channels": 8, "num_convs": 1, "in_index": 3}, "aux_heads": []}))
    atomic_write_text(text / "config.yaml", dump_recipe(cfg))
    with pytest.raises(SegpromptError, match="text-guided backbone"):
        MultiTaskModel.from_runs({"head": runs["head"], "text": text})
    with pytest.raises(SegpromptError, match="not a run directory"):
        MultiTaskModel.from_runs([tmp / "nowhere"])


def test_load_from_runs_share_their_initial_checkpoint(world, data):
    tmp, weights, original, _ = world
    start = fake_run(tmp, "start", data, TUNINGS["full"], [f"model.pretrained={weights}"])
    init = start / "checkpoints" / "best.pt"
    pre = [f"model.pretrained={weights}"]
    runs = {n: fake_run(tmp, f"from_{n}", data, TUNINGS[n], pre, init=init) for n in ("head", "lora")}
    mt = MultiTaskModel.from_runs(runs)
    x = torch.randn(4, 3, 32, 32)
    out = mt(x, ["head", "lora", "lora", "head"])
    with torch.no_grad():
        head, lora = load_run_model(runs["head"])(x[[0, 3]]), load_run_model(runs["lora"])(x[[1, 2]])
    assert torch.equal(out[0], head[0]) and torch.equal(out[3], head[1])
    assert torch.equal(out[1], lora[0]) and torch.equal(out[2], lora[1])
    start_w = ck.load_run_checkpoint(init)["model"]["backbone.stem.0.weight"]
    assert torch.equal(mt.model("head").backbone.stem[0].weight, start_w)
    assert not torch.equal(start_w, original["stem.0.weight"])
    other = fake_run(tmp, "start_b", data, TUNINGS["full"], pre) / "checkpoints" / "best.pt"
    elsewhere = fake_run(tmp, "from_b", data, TUNINGS["head"], pre, init=other)
    with pytest.raises(SegpromptError, match=r"task 'from_b' .* \(initial checkpoint \(--load-from\) sha256"):
        MultiTaskModel.from_runs({**runs, "from_b": elsewhere})


def test_routing_errors_and_task_names(world, tmp_path):
    _, _, _, runs = world
    mt = MultiTaskModel.from_runs({n: runs[n] for n in ("head", "spm")})
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(SegpromptError, match="unknown task 'nope'; this model serves head, spm"):
        mt(x, ["head", "nope"])
    with pytest.raises(SegpromptError, match="2 images but 1 task names"):
        mt(x, ["head"])
    assert [o.shape[0] for o in mt(x, "spm")] == [4, 4]
    # each image prepared for its task exactly as `segprompt eval` prepares it (resize, mean/std)
    task = mt.task("spm")
    sample = build_eval_dataset(task.cfg, task.meta)[0]
    x = task.preprocess(read_image(Path(sample["path"])))
    assert torch.equal(x, normalize(sample["img"], task.cfg.data.mean, task.cfg.data.std))
    assert x.shape == (3, 64, 64) and task.palette == task.meta.palette and task.method == "spm"
    for part in ("a/20240101", "b/20240101", "b/other"):
        (tmp_path / part).mkdir(parents=True)
    assert list(task_names([tmp_path / "a/20240101", tmp_path / "b/20240101"])) == ["a/20240101", "b/20240101"]
    assert list(task_names([tmp_path / "b/other", tmp_path / "a/20240101"])) == ["other", "20240101"]
    with pytest.raises(SegpromptError, match="given twice"):
        task_names([tmp_path / "b/other", tmp_path / "b" / ".." / "b/other"])


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_tasks_writes_what_each_run_predicts_alone(world, data, tmp_path, capsys):
    """`segprompt predict --tasks`: every input under every task, OUT/<task>/ byte for byte what
    `segprompt predict RUN` writes; one frozen backbone; foreign runs and --set refused."""
    tmp, weights, _, runs = world
    val = data / "img_dir" / "val"
    chosen = ["spm", "lora", "bias", "head_k3"]
    spec = ",".join(f"{n}={runs[n]}" for n in chosen)
    with pytest.raises(SystemExit) as e:
        main(["predict", "--tasks", spec, str(val), "--out", str(tmp_path / "multi"), "--format", "index,color",
              "--batch", "3", "--device", "cpu"])
    out = capsys.readouterr()
    assert e.value.code in (0, None), out.err
    assert "predicted 7 image(s)" in out.out and "under 4 task(s) (spm, lora, bias, head_k3; " in out.out
    assert " MiB of frozen tensors shared)" in out.out and " 0.0 MiB" not in out.out
    assert "wrote 56 file(s)" in out.out
    for name in chosen:
        predict(runs[name], [val], tmp_path / "alone" / name, formats=("index", "color"), device="cpu",
                show_progress=False)
        alone = _files(tmp_path / "alone" / name)
        assert len(alone) == 14 and _files(tmp_path / "multi" / name) == alone, name

    # nothing is overwritten without --force, before any model is loaded
    with pytest.raises(SystemExit) as e:
        main(["predict", "--tasks", spec, str(val), "--out", str(tmp_path / "multi"), "--format", "index"])
    assert e.value.code == 2 and "already exist" in capsys.readouterr().err

    other = tmp / "other_pred.pth"
    backbone_file(other, write_recipe(tmp / "r3.yaml", data), seed=9)
    foreign = fake_run(tmp, "foreign_pred", data, TUNINGS["head"], [f"model.pretrained={other}"])
    for args, words in (([f"head={runs['head']},x={foreign}"], "task 'x' was not trained on the same frozen backbone"),
                        ([f"{runs['head']},{runs['spm']}", "--set", "data.num_classes=3"], "--set changes one recipe"),
                        ([f"head={runs['head']},{runs['spm']}"], "name every task or none"),
                        ([f"../up={runs['head']}"], "task name '../up' becomes a folder"),
                        ([str(runs["head"]), "--checkpoint", "deployed"], "--checkpoint deployed with --tasks"),
                        ([f"h={runs['head']}", "--mode", "slide"], "task 'h' ")):
        with pytest.raises(SystemExit) as e:
            main(["predict", "--tasks", *args, str(val), "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err, (args, err)
    assert not (tmp_path / "refused").exists()
