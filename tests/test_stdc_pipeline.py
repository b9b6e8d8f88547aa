"""CLIP-distilled STDC-Seg end to end on synthetic data: stage 1 (fixed class-name embeddings) ->
stage 2 (learned prompts, frozen STDC backbone and CLIP text encoder, started from stage 1's best
checkpoint) -> evaluation of the stage-2 run -> deployment without the text encoder."""

from __future__ import annotations

import json

import pytest
import torch

from segprompt.build import build_model, dataset_meta
from segprompt.config import load_recipe
from segprompt.evaluation.evaluate import evaluate_checkpoint
from segprompt.models.text.clip_text import CLIPTextEncoder
from segprompt.models.text.guidance import TextGuidance, deploy_text
from segprompt.runs import checkpoint as ckpt
from segprompt.training.launch import train

SMALL = [
    "data.batch_size=2", "data.train.scales=null", "data.train.scale=[64,64]", "data.train.ratio_range=[0.75,1.25]",
    "data.train.crop_size=[64,64]", "data.test.scale=[64,64]", "data.num_classes=4", "schedule.warmup_iters=1",
    "schedule.iters=2", "evaluation.interval=2", "checkpoint.interval=2", "runtime.device=cpu",
    "runtime.num_workers=0", "runtime.log_interval=1", "model.pretrained=null",
]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A random-weight CLIP RN50 text tower saved as an open_clip state dict (the real file's path)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "RN50.pt"
    torch.save(CLIPTextEncoder("RN50").state_dict(), path)
    return path


def _set(root, clip, recipe_overrides=()):
    return [f"data.root={root}", *SMALL, f"model.backbone.text.clip_weights={clip}", *recipe_overrides]


def test_stage1_to_stage2_pipeline_and_deployment(tmp_path, synthetic_root, clip_file):
    stage1 = train("recipes/stdc/camvid_stdc1_stage1.yaml", _set(synthetic_root, clip_file), out=tmp_path / "s1")
    cache = list((clip_file.parent / "text_embeddings").glob("*.pt"))
    assert len(cache) == 1, "stage-1 embeddings of the bare class names are computed once and cached"

    over2 = _set(synthetic_root, clip_file, ["model.backbone.text.n_ctx=3"])
    best1 = stage1 / "checkpoints" / "best.pt"
    cfg2 = load_recipe("recipes/stdc/camvid_stdc1_stage2.yaml", over2)
    init = build_model(cfg2, dataset_meta(cfg2))
    ckpt.load_init(init, best1)
    stage2 = train("recipes/stdc/camvid_stdc1_stage2.yaml", over2, out=tmp_path / "s2", load_from=best1)

    state = ckpt.load_checkpoint(stage2 / "checkpoints" / "last.pt")
    trained = state["model"]
    assert any(k.endswith("prompt_learner.ctx") for k in trained), "the prompts train in stage 2"
    assert not any(".stdc." in k and k.endswith("conv.weight") for k in trained), "the STDC backbone is frozen"
    assert not any("prompt_learner.encoder" in k for k in trained), "the CLIP text encoder is frozen"
    assert "init" in state["frozen_source"], "frozen weights are tied to the stage-1 checkpoint"

    # the frozen STDC weights of the stage-2 model are stage 1's, and evaluation restores them
    _, result = evaluate_checkpoint(stage2, checkpoint="last")
    assert result["images"] == 7 and 0.0 <= result["mIoU"] <= 100.0
    meta = dataset_meta(cfg2)
    model = build_model(cfg2, meta)
    ckpt.restore_frozen(model, state, "last.pt")
    ckpt.load_model_state(model, trained, "last.pt")
    stdc_weights = [k for k in init.state_dict() if k.startswith("backbone.stdc.") and k.endswith("conv.weight")]
    assert len(stdc_weights) > 10
    assert all(torch.equal(model.state_dict()[k], init.state_dict()[k]) for k in stdc_weights)

    # deployment: the text encoder and the prompts go, the logits stay
    model.eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(img)
    assert deploy_text(model) == 1
    names = list(model.state_dict())
    assert not any("prompt_learner" in n for n in names)
    assert sum(isinstance(m, TextGuidance) for m in model.modules()) == 1
    with torch.no_grad():
        after = model(img)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert json.loads((stage2 / "eval.json").read_text())["iter"] == 2

    # the run's deployed.pt (best checkpoint, embeddings baked in) evaluates without the CLIP file
    deployed = ckpt.load_checkpoint(stage2 / "checkpoints" / "deployed.pt")
    assert deployed["deployed"] and not any("prompt_learner" in k for k in deployed["model"])
    hidden = clip_file.with_suffix(".hidden")
    clip_file.rename(hidden)
    try:
        _, res_deployed = evaluate_checkpoint(stage2, checkpoint="deployed")
    finally:
        hidden.rename(clip_file)
    _, res_best = evaluate_checkpoint(stage2, checkpoint="best")
    assert res_deployed["mIoU"] == pytest.approx(res_best["mIoU"], abs=1e-6)
