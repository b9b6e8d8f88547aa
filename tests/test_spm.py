"""SPM (Section 3): recurrence, shapes, M0, interim losses, ablation switches, what trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segprompt.data.class_prior import cached_class_prior, compute_class_prior
from segprompt.data.meta import read_meta
from segprompt.models.backbones.resnet import ResNet
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.losses import CrossEntropyLoss
from segprompt.models.segmentor import EncoderDecoder
from segprompt.tuning import TuningContext
from segprompt.tuning.spm import SPMTuning
from segprompt.tuning.spm_layers import SPM, spm_param_count

K = 5


def _model(seed=0):
    torch.manual_seed(seed)
    bb = ResNet(depth=18, base_channels=8, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    loss = CrossEntropyLoss()
    return EncoderDecoder(bb, FCNHead(bb.out_channels[-1], K, channels=8, num_convs=1, loss=loss),
                          [FCNHead(bb.out_channels[2], K, channels=8, num_convs=1, concat_input=False, in_index=2,
                                   loss_weight=0.4, loss=loss)])


def _prior(res):
    rng = np.random.default_rng(0)
    p = rng.random((K, res, res)).astype(np.float32)
    return p / p.sum(0, keepdims=True)


def test_recurrence_shares_weights():
    torch.manual_seed(0)
    one = SPM(16, K, channels=16, recurrent=1)
    three = SPM(16, K, channels=16, recurrent=3)
    three.load_state_dict(one.state_dict())  # same parameter set whatever R is
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in three.parameters())
    torch.nn.init.normal_(one.prompt_out.weight, std=0.1)
    three.load_state_dict(one.state_dict())
    x = torch.randn(2, 16, 9, 11)
    m = torch.softmax(torch.randn(2, K, 5, 5), 1)
    f, s = x, m
    maps = []
    for _ in range(3):
        f, s, inter = one(f, s)
        maps += inter
    f3, s3, inter3 = three(x, m)
    torch.testing.assert_close(f3, f)
    torch.testing.assert_close(s3, s)
    assert len(inter3) == 3
    for a, b in zip(inter3, maps):
        torch.testing.assert_close(a, b)


def test_untrained_spm_passes_features_through():
    spm = SPM(16, K, channels=16, recurrent=2)
    x = torch.randn(1, 16, 8, 8)
    f, s, _ = spm(x, torch.full((1, K, 4, 4), 1 / K))
    assert torch.equal(f, x)
    torch.testing.assert_close(s.sum(1), torch.ones(1, 8, 8))


def test_spm_outputs_match_each_stage_and_losses_are_weighted():
    model = _model()
    seen = {}
    SPMTuning(stages=[1, 2, 3, 4, 5], recurrent=2, channels=16).apply(model, TuningContext(K, class_prior=_prior))
    chain = model.backbone.stage_hook
    for slot, spm in chain.spms.items():
        spm.register_forward_hook(lambda m, inp, out, slot=slot: seen.__setitem__(slot, (inp[0].shape, out)))
    img, label = torch.randn(2, 3, 64, 64), torch.randint(0, K, (2, 64, 64))
    losses = model(img, label)
    channels = model.backbone.slot_channels
    for slot, (in_shape, (feat, smap, interim)) in seen.items():
        assert feat.shape == in_shape and in_shape[1] == channels[int(slot) - 1]
        assert smap.shape == (2, K, *in_shape[-2:]) and len(interim) == 2
    assert set(losses) == {"loss_seg", "loss_aux0", *[f"loss_spm{i}" for i in range(1, 6)]}
    # a_i / R per iteration: slot 5 weighs 0.4, slot 1 0.05 (per summed pair of CE terms)
    ce = CrossEntropyLoss()
    chain.train()
    model.backbone(img)
    interim = dict(chain._interim)
    expect = 0.4 / 2 * sum(ce(torch.nn.functional.interpolate(m, size=(64, 64), mode="bilinear"), label)
                           for m in interim[5])
    torch.testing.assert_close(chain.losses(label)["loss_spm5"], expect)


def test_ablation_switches():
    model = _model()
    SPMTuning(stages=[1, 2], semantic_learning=False, long_range=False, channels=16).apply(model, TuningContext(K))
    losses = model(torch.randn(1, 3, 32, 32), torch.randint(0, K, (1, 32, 32)))
    assert not any(k.startswith("loss_spm") for k in losses)
    for spm in model.backbone.stage_hook.spms.values():
        for pdc in (spm.map_pdc, spm.prompt_pdc):
            assert all(b.dilation == (1, 1) for b in pdc.branches)
    with pytest.raises(ValueError, match="slots 1..5"):
        SPMTuning(stages=[6]).apply(_model(), TuningContext(K))


def test_only_spm_and_heads_train_and_frozen_parts_stay():
    model = _model()
    SPMTuning(stages=[1, 3, 5], channels=16).apply(model, TuningContext(K, class_prior=_prior))
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items() if "stage_hook" not in k}
    from segprompt.config import OptimizerConfig
    from segprompt.training.optim import build_optimizer

    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=1e-3))
    model.train()
    img, label = torch.randn(2, 3, 64, 64), torch.randint(0, K, (2, 64, 64))
    sum(model(img, label).values()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters()
                         if n.startswith(("backbone.stage_hook.", "decode_head.", "aux_heads."))}
    assert any(".spms.5." in n for n in with_grad) and not any(".spms.2." in n for n in with_grad)
    opt.step()
    for k, v in model.backbone.state_dict().items():
        if "stage_hook" not in k:
            assert torch.equal(v, frozen[k]), k
    # M0 travels with the checkpoint; frozen BN statistics do not
    from segprompt.runs.checkpoint import changed_state_dict

    state = changed_state_dict(model)
    assert "backbone.stage_hook.prior" in state and not any("running_mean" in k and "stage_hook" not in k
                                                            and k.startswith("backbone") for k in state)


def test_default_design_matches_the_vit_table_count():
    # design D2 (docs/spm.md, "What one SPM costs"): P = 108,032 + 393·Cf + 513·K
    for cf, k in [(1024, 150), (64, 150), (2048, 6), (256, 2)]:
        assert spm_param_count(cf, k) == 108_032 + 393 * cf + 513 * k


def test_class_prior_sums_to_one_and_is_cached(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(synthetic_root, root)
    meta = read_meta(root)
    labels = sorted((root / "ann_dir" / "train").glob("*.png"))
    prior = compute_class_prior(labels, meta.num_classes, 255, 16)
    assert prior.shape == (meta.num_classes, 16, 16)
    np.testing.assert_allclose(prior.sum(0), 1.0, rtol=1e-6)
    assert prior[0].mean() > prior[1:].mean()  # background dominates the synthetic scenes
    cached = cached_class_prior(root, labels, meta.num_classes, 255, 16)
    np.testing.assert_array_equal(cached, prior)
    files = list((root / "class_prior").glob("*_r16_*.npy"))  # other tests may have cached other resolutions
    assert len(files) == 1
    np.save(files[0], np.zeros_like(prior) + 7)  # the cache is what is read back
    assert cached_class_prior(root, labels, meta.num_classes, 255, 16).max() == 7
    one = cached_class_prior(root, labels[:1], meta.num_classes, 255, 16)  # another label set, another file
    assert len(list((root / "class_prior").glob("*_r16_*.npy"))) == 2 and one.max() == 1.0


def test_vaihingen_spm_recipe_runs_end_to_end_on_vaihingen_shaped_synthetic_data(tmp_path):
    from pathlib import Path

    from segprompt.data.synthetic import generate_synthetic
    from segprompt.training.launch import train

    root = tmp_path / "vaihingen_like"
    generate_synthetic(root, seed=3, num_classes=6, image_size=(64, 64), counts={"train": 4, "val": 2, "test": 1})
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "vaihingen_spm.yaml"
    run = train(recipe, [f"data.root={root}", "data.dataset=synthetic", "model.pretrained=null",
                         "schedule.iters=2", "data.batch_size=2", "data.train.scale=[64,64]",
                         "data.train.crop_size=[64,64]", "data.test.scale=[64,64]", "evaluation.interval=0",
                         "checkpoint.interval=2", "runtime.num_workers=0"], out=tmp_path / "run")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    spm_keys = [k for k in state["model"] if k.startswith("backbone.stage_hook.spms.")]
    assert {k.split(".")[3] for k in spm_keys} == {"1", "2", "3", "4"}  # Table 2's Ours: slots 1-4
    assert not any(k.startswith("backbone.layer") for k in state["model"])  # the ResNet-101 stays frozen
    import json

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_spm1", "loss_spm4"} <= set(records[0])


def test_spm_model_at_initialisation_is_exactly_the_frozen_model():
    frozen, tuned = _model(), _model()
    tuned.load_state_dict(frozen.state_dict())
    SPMTuning(stages=[1, 2, 3, 4, 5], recurrent=2, channels=16).apply(tuned, TuningContext(K, class_prior=_prior))
    frozen.eval(), tuned.eval()
    img = torch.randn(2, 3, 48, 40)
    feats_f, feats_t = frozen.backbone(img), tuned.backbone(img)
    for a, b in zip(feats_f, feats_t):
        assert torch.equal(a, b)  # F + F * 0 is F, bit for bit
    assert torch.equal(frozen(img), tuned(img))


def test_one_training_step_changes_the_prompt_output():
    from segprompt.config import OptimizerConfig
    from segprompt.training.optim import build_optimizer

    model = _model()
    SPMTuning(stages=[1, 3], recurrent=1, channels=16).apply(model, TuningContext(K, class_prior=_prior))
    chain = model.backbone.stage_hook
    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.0))
    img, label = torch.randn(2, 3, 48, 48), torch.randint(0, K, (2, 48, 48))
    model.train()
    sum(model(img, label).values()).backward()
    diag = chain.diagnostics()
    assert diag["spm1_prompt_ratio"] == 0.0 and diag["spm3_prompt_ratio"] == 0.0  # W starts at zero
    assert diag["spm1_grad_prompt"] > 0 and diag["spm3_grad_prompt"] > 0  # ... but Out_d gets a gradient
    assert diag["spm1_grad_map"] > 0
    opt.step()
    opt.zero_grad()
    model(img, label)
    assert chain.diagnostics()["spm1_prompt_ratio"] > 0  # after one step the prompts change the features


def test_groups_scale_with_the_width():
    from segprompt.tuning.spm_layers import scaled_groups

    assert [scaled_groups(g, 256) for g in (1, 2, 4, 32)] == [1, 2, 4, 32]  # the paper's width: unchanged
    assert [scaled_groups(g, 32) for g in (1, 2, 4, 32)] == [1, 1, 1, 4]
    narrow = SPM(16, K, channels=32)
    assert narrow.prompt_out.groups == 4 and narrow.map_pdc.branches[0].groups == 1 and narrow.map_pdc.fuse.groups == 1
    literal = SPM(16, K, channels=32, scale_groups=False)
    assert literal.prompt_out.groups == 16 and literal.map_pdc.branches[0].groups == 4
    # channels per group: 32 / 4 = 8 hidden channels feed each prompt gate group (2 without scaling)
    assert narrow.prompt_out.weight.shape[1] == 8 and literal.prompt_out.weight.shape[1] == 2
    assert spm_param_count(1024, 150, channels=256) == spm_param_count(1024, 150, channels=256, scale_groups=False)
    with pytest.raises(ValueError, match="multiple of 4"):
        SPM(16, K, channels=30)


def test_training_records_spm_diagnostics(tmp_path):
    import json
    from pathlib import Path

    from segprompt.data.synthetic import generate_synthetic
    from segprompt.training.launch import train

    root = tmp_path / "d"
    generate_synthetic(root, seed=1, num_classes=K, image_size=(48, 48), counts={"train": 4, "val": 2})
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"
    run = train(recipe, [f"data.root={root}", f"data.num_classes={K}", "tuning.name=spm", "tuning.stages=[1,3,5]",
                         "tuning.channels=16", "schedule.iters=3", "evaluation.interval=3", "checkpoint.interval=3",
                         "runtime.log_interval=1", "runtime.num_workers=0", "data.batch_size=2",
                         "data.train.scale=[48,48]", "data.train.crop_size=[40,40]", "data.test.scale=[48,48]"],
                out=tmp_path / "run")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    assert len(train_recs) == 3
    for slot in (1, 3, 5):
        assert all(f"spm{slot}_grad_prompt" in r and f"spm{slot}_grad_map" in r for r in train_recs)
        assert train_recs[0][f"spm{slot}_prompt_ratio"] == 0.0 < train_recs[-1][f"spm{slot}_prompt_ratio"]
    evals = [r for r in records if r.get("split") == "val"]
    assert evals and all(0 <= evals[-1][f"spm{s}_interim_mIoU"] <= 100 for s in (1, 3, 5))
    result = json.loads((run / "eval.json").read_text())
    assert "spm5_interim_mIoU" in result


def test_training_never_writes_into_the_dataset_folder(data_copy, tmp_path, monkeypatch):
    from conftest import write_recipe

    from segprompt.training.launch import train

    monkeypatch.setenv("SEGPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    before = sorted(str(p.relative_to(data_copy)) for p in data_copy.rglob("*"))
    recipe = write_recipe(tmp_path / "r.yaml", data_copy)
    # a subset's prior is not the one `prepare` wrote: it is computed, and cached outside the dataset
    train(recipe, ["tuning={name: spm, channels: 8}", "data.train_subset=5", "schedule.iters=1",
                   "evaluation.interval=1", "checkpoint.interval=1"], out=tmp_path / "run")
    assert sorted(str(p.relative_to(data_copy)) for p in data_copy.rglob("*")) == before
    assert len(list((tmp_path / "cache" / "class_prior").rglob("*.npy"))) == 1
