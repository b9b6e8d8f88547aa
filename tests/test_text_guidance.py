"""CLIP text guidance: text tower loading (OpenAI TorchScript and open_clip state dicts), prompt
learner, stage-1 embedding cache, score map, deployment and the text-score head.

One random-weight open_clip RN50 (QuickGELU, as OpenAI's weights) is built per module and written
to disk in both formats; every other model is the text tower alone.
"""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.models import HEADS
from segprompt.models.heads.text_score import TextScoreHead
from segprompt.models.text.clip_text import CLIPTextEncoder
from segprompt.models.text.guidance import (
    TextGuidance,
    deploy_text,
    load_text_pretrained,
)
from segprompt.models.text.prompt_learner import PromptLearner

NAMES = ["road", "Column_Pole", "traffic light"]
CAMVID = ["Bicyclist", "Building", "Car", "Column_Pole", "Fence", "Pedestrian", "Road", "Sidewalk",
          "SignSymbol", "Sky", "Tree"]
# tensors OpenAI's TorchScript RN50.pt carries besides the model's parameters (popped by open_clip's
# build_model_from_openai_state_dict)
OPENAI_SCALARS = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}


@pytest.fixture(scope="module")
def clip_model():
    """open_clip's RN50 with random weights rounded to float16 (so the float16 OpenAI-style file
    holds exactly the same numbers as the float32 open_clip-style one)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model("RN50", pretrained=None, force_quick_gelu=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


@pytest.fixture(scope="module")
def encoder(clip_model):
    enc = CLIPTextEncoder("RN50")
    own = enc.state_dict().keys()
    enc.load_state_dict({k: v for k, v in clip_model.state_dict().items() if k in own})
    return enc.eval()


def _reference(clip_model, names):
    with torch.no_grad():
        return clip_model.encode_text(open_clip.get_tokenizer("RN50")(names))


def _openai_torchscript(state: dict[str, torch.Tensor], path) -> None:
    """A TorchScript archive whose state dict has OpenAI's RN50.pt layout: every CLIP tensor under
    its own dotted name, in float16, plus the three scalars OpenAI's archive carries."""
    root = nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        m = root
        for name in parents:
            if not hasattr(m, name):
                m.add_module(name, nn.Module())
            m = getattr(m, name)
        if key in OPENAI_SCALARS:
            m.register_buffer(leaf, value)
        else:
            m.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def clip_files(clip_model, tmp_path_factory):
    """``openai``: TorchScript, float16, the whole model; ``open_clip``: a float32 state dict with the
    text tower, ``logit_scale`` and the visual tower's small tensors (enough to show they are skipped)."""
    root = tmp_path_factory.mktemp("clip")
    state = clip_model.state_dict()
    openai = root / "openai" / "RN50.pt"
    openai.parent.mkdir()
    full = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    full.update({k: torch.tensor(v) for k, v in OPENAI_SCALARS.items()})
    _openai_torchscript(full, openai)
    oc = root / "open_clip" / "RN50.pt"
    oc.parent.mkdir()
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.") or v.numel() < 10_000}, oc)
    return {"openai": openai, "open_clip": oc, "root": root}


# ---- text tower --------------------------------------------------------------------------------
def test_text_tower_is_clip_rn50_without_visual_tower(encoder, clip_model):
    assert encoder.token_embedding.weight.shape == (49408, 512)
    assert encoder.positional_embedding.shape == (77, 512)
    assert len(encoder.transformer.resblocks) == 12 and encoder.transformer.resblocks[0].attn.num_heads == 8
    assert encoder.text_projection.shape == (512, 1024)
    above = torch.ones(77, 77, dtype=torch.bool).triu(1)
    assert torch.isneginf(encoder.attn_mask[above]).all() and (encoder.attn_mask[~above] == 0).all()
    text_keys = {k for k in clip_model.state_dict() if not k.startswith("visual.") and k != "logit_scale"}
    assert set(encoder.state_dict()) == text_keys
    assert not any(isinstance(m, type(clip_model.visual)) for m in encoder.modules())


def test_encode_names_is_open_clip_encode_text(encoder, clip_model):
    with torch.no_grad():
        ours = encoder.encode_names(NAMES)
    assert ours.shape == (3, 1024)
    torch.testing.assert_close(ours, _reference(clip_model, NAMES), rtol=0, atol=2e-5)


def test_zero_context_prompt_learner_reproduces_encode_text(encoder, clip_model):
    learner = PromptLearner(encoder, NAMES, n_ctx=0, name_length=5)
    assert learner.context_length == 5 and learner.ctx.numel() == 0
    with torch.no_grad():
        short = learner()
        full = encoder.encode_names(NAMES)
    # 5 tokens vs 77: they differ only in trailing padding, which the causal mask hides from EOT ...
    torch.testing.assert_close(short, _reference(clip_model, NAMES), rtol=0, atol=2e-5)
    # ... and it is the mask that hides it: attending both ways, the 72 extra pads change the result
    causal = encoder.attn_mask.clone()
    try:
        encoder.attn_mask.zero_()
        with torch.no_grad():
            assert (learner() - encoder.encode_names(NAMES)).abs().max() > 1e-2
    finally:
        encoder.attn_mask.copy_(causal)
    torch.testing.assert_close(encoder.encode_names(NAMES).detach(), full)


def test_context_vectors_sit_between_sot_and_the_name(encoder, clip_model):
    # context vectors set to the token embeddings of "a photo of a" make the prompt that phrase
    phrase = encoder.tokenizer.encode("a photo of a")
    learner = PromptLearner(encoder, NAMES, n_ctx=len(phrase), name_length=5)
    with torch.no_grad():
        learner.ctx.copy_(encoder.token_embedding(torch.tensor(phrase)).expand(3, -1, -1))
        ours = learner()
    torch.testing.assert_close(ours, _reference(clip_model, [f"a photo of a {n}" for n in NAMES]), rtol=0, atol=2e-5)


def test_prompt_layout_and_long_names(encoder):
    learner = PromptLearner(encoder, CAMVID, n_ctx=11, name_length=5)
    assert learner.context_length == 16 and learner.ctx.shape == (11, 11, 512)
    # the reference's longest CamVid names fill all 5 name slots: EOT is the last of 16 positions
    eot = learner.name_tokens.argmax(-1) + learner.n_ctx
    assert eot[CAMVID.index("Bicyclist")] == 15 and eot[CAMVID.index("Column_Pole")] == 15
    assert eot[CAMVID.index("Car")] == 13
    assert 0.015 < learner.ctx.std().item() < 0.025 and abs(learner.ctx.mean().item()) < 0.005
    with pytest.raises(SegpromptError, match="'motorcycle with sidecar'.*name_length"):
        PromptLearner(encoder, ["road", "motorcycle with sidecar"], n_ctx=11, name_length=5)


def test_both_file_formats_load_to_the_same_embeddings(clip_model, clip_files):
    outs = {}
    for fmt in ("openai", "open_clip"):
        enc = CLIPTextEncoder("RN50")
        enc.load_pretrained(clip_files[fmt])
        assert enc.token_embedding.weight.dtype == torch.float32
        with torch.no_grad():
            outs[fmt] = enc.encode_names(NAMES)
    assert torch.equal(outs["openai"], outs["open_clip"])
    torch.testing.assert_close(outs["openai"], _reference(clip_model, NAMES), rtol=0, atol=2e-5)
    # the archive really is in OpenAI's layout: open_clip's own OpenAI loader rebuilds CLIP from it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = open_clip.load_openai_model(str(clip_files["openai"]), precision="fp32", device="cpu")
    torch.testing.assert_close(_reference(theirs, NAMES), outs["openai"], rtol=0, atol=2e-5)


def test_missing_file_and_missing_key_are_clear_errors(clip_model, clip_files, tmp_path):
    absent = tmp_path / "pretrained" / "clip" / "RN50.pt"
    for prompt in ("fixed", "learned"):
        with pytest.raises(SegpromptError, match=r"RN50\.pt.*do not exist.*openaipublic.*RN50\.pt"):
            TextGuidance(NAMES, clip_weights=str(absent), prompt=prompt).load_pretrained()
    # open_clip trainer layout ({"state_dict": {"module.<key>": ...}}) with ln_final.weight missing
    state = {f"module.{k}": v for k, v in clip_model.state_dict().items() if k != "ln_final.weight"}
    broken = tmp_path / "broken.pt"
    torch.save({"epoch": 3, "state_dict": state}, broken)
    with pytest.raises(SegpromptError, match=r"broken\.pt.*1 missing text keys \['ln_final\.weight'\].*0 unexpected"):
        CLIPTextEncoder("RN50").load_pretrained(broken)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SegpromptError, match="garbage.pt.*cannot be read"):
        CLIPTextEncoder("RN50").load_pretrained(garbage)


# ---- stage 1: fixed embeddings and their cache ---------------------------------------------------
def test_stage1_cache_is_read_back_and_keyed_by_class_names(clip_model, clip_files, tmp_path, monkeypatch):
    clip_dir = tmp_path / "pretrained" / "clip"
    clip_dir.mkdir(parents=True)
    weights = clip_dir / "RN50.pt"
    weights.symlink_to(clip_files["openai"])

    first = TextGuidance(NAMES, clip_weights=str(weights))
    first.load_pretrained()
    cached = sorted((clip_dir / "text_embeddings").glob("*.pt"))
    assert len(cached) == 1
    torch.testing.assert_close(first.embeddings, _reference(clip_model, NAMES), rtol=0, atol=2e-5)

    def no_clip(*args, **kwargs):
        raise AssertionError("CLIP was loaded although the embeddings are cached")

    monkeypatch.setattr(CLIPTextEncoder, "load_pretrained", no_clip)
    second = TextGuidance(NAMES, clip_weights=str(weights))
    second.load_pretrained()  # CLIP file present: found by its hash
    assert torch.equal(second.embeddings, first.embeddings)
    weights.unlink()
    third = TextGuidance(NAMES, clip_weights=str(weights))
    third.load_pretrained()  # CLIP file gone: found by the class names
    assert torch.equal(third.embeddings, first.embeddings)
    monkeypatch.undo()

    weights.symlink_to(clip_files["openai"])
    other = TextGuidance(NAMES[:2], clip_weights=str(weights))
    other.load_pretrained()
    assert len(sorted((clip_dir / "text_embeddings").glob("*.pt"))) == 2
    torch.testing.assert_close(other.embeddings, first.embeddings[:2], rtol=0, atol=2e-5)


# ---- the score map --------------------------------------------------------------------------------
def test_score_map_is_cosine(clip_model):
    torch.manual_seed(1)
    tg = TextGuidance(NAMES)  # random fixed embeddings: no file is needed for the score map itself
    assert tg.num_classes == 3 and [n for n, _ in tg.named_buffers()] == ["embeddings"]
    assert not list(tg.parameters())
    f4 = torch.randn(2, 1024, 3, 4)
    f4[1, :, 2, 3] = 3.7 * tg.embeddings[1]
    s = tg(f4)
    assert s.shape == (2, 3, 3, 4)
    assert s.abs().max() <= 1 + 1e-6
    assert abs(s[1, 1, 2, 3].item() - 1) < 1e-6
    expected = F.cosine_similarity(f4.unsqueeze(1), tg.embeddings[None, :, :, None, None], dim=2)
    torch.testing.assert_close(s, expected, rtol=0, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = tg(f4.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, rtol=0, atol=1e-2)


# ---- stage 2: learned prompts ----------------------------------------------------------------------
def test_learned_prompts_get_gradients_and_clip_stays_frozen():
    torch.manual_seed(2)
    tg = TextGuidance(NAMES, prompt="learned", n_ctx=4).train()
    encoder = tg.prompt_learner.encoder
    assert not encoder.training and all(not p.requires_grad for p in encoder.parameters())
    assert [n for n, p in tg.named_parameters() if p.requires_grad] == ["prompt_learner.ctx"]
    f4 = torch.randn(2, 1024, 4, 4, requires_grad=True)
    label = torch.randint(0, 3, (2, 16, 16))
    head = TextScoreHead(in_channels=3, num_classes=3)
    head.loss(head([f4, tg(f4)]), label).backward()
    assert tg.prompt_learner.ctx.grad is not None and tg.prompt_learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_building_reads_no_file_and_works_on_meta():
    with torch.device("meta"):
        tg = TextGuidance(CAMVID, clip_weights="/nonexistent/RN50.pt", prompt="learned")
    trainable = sum(p.numel() for p in tg.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in tg.parameters() if not p.requires_grad)
    assert trainable == 11 * 11 * 512  # K x M x 512 context vectors (CamVid, M = 11)
    block = (3 * 512 * 512 + 3 * 512) + (512 * 512 + 512) + 2 * 2 * 512 + (512 * 2048 + 2048) + (2048 * 512 + 512)
    assert frozen == 49408 * 512 + 77 * 512 + 12 * block + 2 * 512 + 512 * 1024  # the RN50 text tower, 63.7M


# ---- deployment -----------------------------------------------------------------------------------
def test_deploy_keeps_the_learned_embeddings_and_drops_clip(clip_model, clip_files):
    torch.manual_seed(3)
    tg = TextGuidance(NAMES, clip_weights=str(clip_files["open_clip"]), prompt="learned")
    assert load_text_pretrained(nn.Sequential(nn.Identity(), tg)) == 1
    torch.testing.assert_close(tg.prompt_learner.encoder.text_projection, clip_model.text_projection)
    with torch.no_grad():
        tg.prompt_learner.ctx.normal_(std=0.5)  # as if trained
    tg.eval()
    f4 = torch.randn(1, 1024, 5, 5)
    with torch.no_grad():
        before = tg(f4)
    holder = nn.ModuleDict({"a": tg, "b": TextGuidance(NAMES)})
    assert deploy_text(holder) == 1 and deploy_text(holder) == 0
    assert list(tg.state_dict()) == ["embeddings"] and not list(tg.parameters())
    assert not hasattr(tg, "prompt_learner")
    torch.testing.assert_close(tg(f4), before, rtol=0, atol=1e-6)
    # a deployed state dict is what a fixed module loads (e.g. from a deployed checkpoint)
    fresh = TextGuidance(NAMES)
    fresh.load_state_dict(tg.state_dict())
    torch.testing.assert_close(fresh(f4), before, rtol=0, atol=1e-6)
    with pytest.raises(SegpromptError, match="deployed"):
        tg.load_pretrained()


# ---- the text-score head --------------------------------------------------------------------------
def test_text_score_head_is_s_over_temperature_with_ce():
    assert HEADS["text_score"] is TextScoreHead
    torch.manual_seed(4)
    s = torch.rand(2, 3, 4, 4) * 2 - 1
    label = torch.randint(0, 3, (2, 32, 32))
    label[0, :5] = 255
    head = TextScoreHead(in_channels=3, num_classes=3, in_index=1)
    logits = head([torch.randn(2, 8, 4, 4), s])
    torch.testing.assert_close(logits, s / 0.07)
    up = F.interpolate(s / 0.07, size=(32, 32), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, label, ignore_index=255, reduction="none").mean()
    torch.testing.assert_close(head.loss(logits, label), expected)
    assert not list(head.parameters())
    with pytest.raises(SegpromptError, match="in_index"):
        TextScoreHead(in_channels=1024, num_classes=3)
