"""segprompt export (ONNX / TorchScript) and ONNX timing in segprompt bench (docs/deploy.md): the
exported file reproduces the PyTorch model (smoke, SPM, LoRA merged, text-guided STDC with its
embeddings baked in), its record says what it is, a missing extra and an existing --out are clear
errors, and bench times an ONNX file under the same protocol, --vs across the two engines."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli, write_recipe

from segprompt.build import apply_tuning, build_segmentor, dataset_meta, tuning_context
from segprompt.cli import main
from segprompt.config import dump_recipe, load_recipe
from segprompt.data.dataset import read_image
from segprompt.data.transforms import normalize
from segprompt.errors import SegpromptError
from segprompt.measure.bench import BenchOptions, run_bench
from segprompt.runs import checkpoint as ckpt
from segprompt.runs.load import build_source_model, read_source
from segprompt.serve import export as export_mod
from segprompt.serve.export import ExportOptions, export_model, sidecar
from segprompt.training.launch import train
from segprompt.training.loop import deploy_best

ort = pytest.importorskip("onnxruntime", reason="the deploy extra (pip install 'segprompt[deploy]')")
onnx = pytest.importorskip("onnx", reason="the deploy extra (pip install 'segprompt[deploy]')")

TWO_ITERS = {"schedule": {"iters": 2, "warmup_iters": 1}, "evaluation": {"interval": 2},
             "checkpoint": {"interval": 2}, "optimizer": {"name": "sgd", "lr": 0.5}}


def _run(tmp_path_factory, synthetic_root, name: str, **sections) -> tuple:
    """A finished 2-iteration run of the tiny recipe (its weights moved off their initialisation)."""
    tmp = tmp_path_factory.mktemp(name)
    recipe = write_recipe(tmp / f"{name}.yaml", synthetic_root, **{**TWO_ITERS, **sections})
    return train(recipe, out=tmp / "run"), recipe


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, synthetic_root):
    return _run(tmp_path_factory, synthetic_root, "smoke")[0]


@pytest.fixture(scope="module")
def smoke_onnx(smoke_run, tmp_path_factory):
    """The smoke run exported to ONNX at its default size (data.test.scale, 64x64): (file, record)."""
    out = tmp_path_factory.mktemp("export") / "deploy" / "smoke.onnx"
    return out, export_model(smoke_run, out, ExportOptions())


@pytest.fixture(scope="module")
def lora_onnx(tmp_path_factory, synthetic_root):
    """A LoRA run exported with --dynamic: (run, file, record)."""
    run, _ = _run(tmp_path_factory, synthetic_root, "lora", tuning={"name": "lora", "rank": 2, "target": "layer4"})
    out = run.parent / "lora.onnx"
    return run, out, export_model(run, out, ExportOptions(dynamic=True, size=(32, 32)))


def _checkpoint_model(run, name="best.pt"):
    """The run's model from its checkpoint, read as `segprompt eval` reads it (nothing merged)."""
    src = read_source(run / "checkpoints" / name)
    return src.cfg, build_source_model(src)


def _val_image(cfg) -> torch.Tensor:
    """A real validation image of the run's dataset, normalised as evaluation feeds it."""
    path = sorted((Path(cfg.data.root) / "img_dir" / "val").iterdir())[0]
    img = torch.from_numpy(read_image(path)).permute(2, 0, 1)[None].contiguous()
    return normalize(img, cfg.data.mean, cfg.data.std)


def _ort_logits(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x.numpy()})[0]


def test_onnx_export_of_a_run_reproduces_pytorch_and_records_what_it_is(smoke_run, smoke_onnx):
    out, record = smoke_onnx
    # the record beside the file
    on_disk = json.loads(sidecar(out).read_text())
    assert on_disk == record and record["verified"]
    assert record["checkpoint"] == str(smoke_run / "checkpoints" / "best.pt") and record["iteration"] == 2
    assert record["checkpoint_sha256"] == ckpt.sha256_file(smoke_run / "checkpoints" / "best.pt")
    assert record["input_shape"] == [1, 3, 64, 64] and record["output_shape"] == [1, 4, 64, 64]
    assert record["opset"] >= 17 and record["file_bytes"] == out.stat().st_size
    cfg = load_recipe(smoke_run / "config.yaml")
    assert record["classes"] == dataset_meta(cfg).classes and record["class_names"] == "checkpoint"
    assert record["input"]["mean"] == list(cfg.data.mean)
    (check,) = record["parity"]["checks"]
    assert check["ok"] and check["max_abs_diff"] < 1e-4 and check["argmax_agreement"] == 1.0
    onnx.checker.check_model(str(out), full_check=True)
    # independently of the record: a real validation image through onnxruntime and through eval's model
    cfg, model = _checkpoint_model(smoke_run)
    x = _val_image(cfg)
    with torch.no_grad():
        ref = model(x).numpy()
    got = _ort_logits(out, x)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).mean() == 1.0
    # the auxiliary head is not in the graph (only what model(img) reads)
    weights = record["weights_in_file"]
    aux = sum(p.numel() for p in model.aux_heads.parameters())
    assert weights < sum(p.numel() for p in model.parameters()) - aux + 1000 < weights + aux


def test_spm_run_exports_its_whole_image_forward(tmp_path_factory, synthetic_root, tmp_path):
    spm = {"name": "spm", "stages": [1, 3, 5], "channels": 8, "prompt_out_groups": 8, "map_out_groups": 2,
           "pdc_groups": 2, "pdc_fuse_groups": 2}
    run, _ = _run(tmp_path_factory, synthetic_root, "spm", tuning=spm)
    out = tmp_path / "spm.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = export_model(run, out, ExportOptions(size=(48, 64)))
    assert not [w for w in caught if "assigned during export" in str(w.message)]  # scratch values, not state
    assert record["tuning"] == "spm" and record["verified"] and record["input_shape"] == [1, 3, 48, 64]
    cfg, model = _checkpoint_model(run)
    chain = model.backbone.stage_hook
    assert any(p.abs().sum() > 0 for n, p in chain.named_parameters() if "prompt_out" in n)  # trained off zero
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).numpy()
        frozen = model.backbone.stage_hook
        model.backbone.stage_hook = None  # the same network without its SPMs
        plain = model(x).numpy()
        model.backbone.stage_hook = frozen
    got = _ort_logits(out, x)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(plain - ref).max() > 100 * np.abs(got - ref).max()  # the SPMs are in the graph


def test_lora_is_merged_into_one_plain_graph(lora_onnx):
    run, out, record = lora_onnx
    assert record["lora_merged"] > 0 and record["verified"]
    assert record["input_shape"] == ["batch", 3, "height", "width"] and len(record["parity"]["checks"]) == 2
    names = [t.name for t in onnx.load(str(out)).graph.initializer]
    assert not any("lora" in n for n in names), [n for n in names if "lora" in n][:4]
    cfg, model = _checkpoint_model(run)  # peft's LoRA layers, unmerged
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(5))  # another batch and size
    with torch.no_grad():
        ref = model(x).numpy()
    got = _ort_logits(out, x)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory, synthetic_root):
    """A stage-2 text-guided STDC1 run directory holding only its deployed.pt, and the learned-prompt
    model's logits on one input (computed with the text encoder, before deployment)."""
    tmp = tmp_path_factory.mktemp("stage2")
    cfg = load_recipe(REPO / "recipes/stdc/camvid_stdc1_stage2.yaml",
                      [f"data.root={synthetic_root}", "data.num_classes=4", "data.test.scale=[64,64]",
                       "model.backbone.text.n_ctx=3", "model.pretrained=null"])
    meta = dataset_meta(cfg)
    model = build_segmentor(cfg, meta, load_pretrained=False)
    apply_tuning(model, cfg, tuning_context(cfg, meta))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("prompt_learner.ctx"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        learned = model(x).numpy()
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_recipe(cfg))
    deploy_best(model, run, cfg)
    return run, x, learned


def test_text_guided_stdc_exports_baked_embeddings_without_the_text_encoder(stage2_run, tmp_path):
    run, x, learned = stage2_run
    out = tmp_path / "stdc.onnx"
    record = export_model(run, out, ExportOptions())  # auto: the run's deployed.pt
    assert record["checkpoint"].endswith("deployed.pt") and record["text_deployed"] == 1 and record["verified"]
    got = _ort_logits(out, x)
    assert np.abs(got - learned).max() < 1e-4 * max(1.0, np.abs(learned).max())
    names = [t.name for t in onnx.load(str(out)).graph.initializer]
    assert not any("prompt_learner" in n or "token_embedding" in n for n in names)
    # STDC1 + context path + decode head is ~8.3M weights; CLIP RN50's text tower alone would add ~38M
    assert 7e6 < record["weights_in_file"] < 1e7


def test_torchscript_export_loads_and_matches_at_two_sizes(smoke_run, tmp_path):
    out = tmp_path / "smoke.pt"
    record = export_model(smoke_run, out, ExportOptions(format="torchscript", dynamic=True))
    assert record["format"] == "torchscript" and record["verified"] and len(record["parity"]["checks"]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.14 (docs/deploy.md)
        loaded = torch.jit.load(str(out))
    cfg, model = _checkpoint_model(smoke_run)
    for x in (_val_image(cfg), torch.randn(3, 3, 32, 80)):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # one more export (a few seconds); the fp32 tests cover the export path
def test_fp16_export_runs_on_onnxruntime_cpu(smoke_run, tmp_path):
    out = tmp_path / "fp16.onnx"
    record = export_model(smoke_run, out, ExportOptions(dtype="fp16", size=(32, 32)))
    assert record["dtype"] == "fp16" and record["verified"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"
    kinds = {}
    for t in onnx.load(str(out)).graph.initializer:
        kinds[t.data_type] = kinds.get(t.data_type, 0) + int(np.prod(t.dims))
    assert kinds.get(onnx.TensorProto.FLOAT16, 0) > 0.99 * sum(kinds.values())  # the weights are stored in fp16


def test_a_file_that_does_not_reproduce_pytorch_is_kept_and_reported(smoke_run, tmp_path, monkeypatch):
    real = export_mod.run_exported
    monkeypatch.setattr(export_mod, "run_exported", lambda *a: [y + 0.5 for y in real(*a)])
    out = tmp_path / "bad.pt"
    with pytest.raises(SegpromptError, match="does not reproduce PyTorch") as e:
        export_model(smoke_run, out, ExportOptions(format="torchscript", size=(32, 32)))
    assert str(out) in str(e.value) and out.is_file()
    assert json.loads(sidecar(out).read_text())["verified"] is False


def test_existing_out_is_never_replaced_without_force(smoke_run, tmp_path):
    opts = {"format": "torchscript", "size": (32, 32)}
    out = tmp_path / "mine.pt"
    out.write_bytes(b"my own file")
    with pytest.raises(SegpromptError, match="--force") as e:
        export_model(smoke_run, out, ExportOptions(**opts))
    assert str(out) in str(e.value) and out.read_bytes() == b"my own file" and not sidecar(out).exists()
    other = tmp_path / "other.onnx"
    sidecar(other).write_text("{}")  # a record alone blocks too: it belongs to someone's file
    with pytest.raises(SegpromptError, match="other.onnx.json"):
        export_model(smoke_run, other, ExportOptions(size=(32, 32)))
    assert not other.exists() and sidecar(other).read_text() == "{}"
    export_model(smoke_run, out, ExportOptions(**opts, force=True))
    assert out.read_bytes() != b"my own file" and json.loads(sidecar(out).read_text())["verified"]


def test_missing_extra_and_bad_options_are_one_line_errors(smoke_run, tmp_path, capsys, monkeypatch):
    def cli(*args):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        return e.value.code, capsys.readouterr().err.strip()

    code, err = cli("export", smoke_run, "--out", tmp_path / "a.onnx", "--format", "tflite")
    assert code == 2 and err.startswith("error: ") and "tflite" in err and "torchscript" in err
    code, err = cli("export", smoke_run, "--out", tmp_path / "a.bin")
    assert code == 2 and "a.onnx" in err  # an ONNX file ends in .onnx (bench recognises it by that)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    code, err = cli("export", smoke_run, "--out", tmp_path / "a.onnx")
    assert code == 2 and "'onnxruntime'" in err and "segprompt[deploy]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a.onnx").exists()
    with pytest.raises(SegpromptError, match=r"segprompt\[deploy\]"):
        run_bench(tmp_path / "x.onnx", BenchOptions(device="cpu"))


def _fast(**kw) -> BenchOptions:
    return BenchOptions(**{"warmup": 1, "calib_seconds": 0.02, "seconds": 0.1, "chunks": 2, "device": "cpu",
                           "threads": 1, **kw})


def test_bench_times_an_onnx_file_alternately_with_pytorch(smoke_run, smoke_onnx):
    out, _ = smoke_onnx
    result = run_bench(out, _fast(), vs=smoke_run)
    assert result["engine"] == "onnxruntime" and result["vs"]["engine"] == "pytorch"
    assert result["provider"] == "CPUExecutionProvider" and result["size"] == [64, 64]  # the file's size
    assert result["tuning"] == "full" and result["flops_mmcv"] is None and result["vs"]["flops_mmcv"] > 0
    assert result["params"] == json.loads(sidecar(out).read_text())["weights_in_file"]
    for m in (result, result["vs"]):
        assert m["fps"] > 0 and len(m["latency_ms_chunks"]) == 2
    assert result["fps_ratio"] == pytest.approx(result["fps"] / result["vs"]["fps"])
    # what the file cannot be timed with is refused before timing
    with pytest.raises(SegpromptError, match="fixed 64x64 input"):
        run_bench(out, _fast(size=(32, 48)))
    with pytest.raises(SegpromptError, match="--dtype fp32"):
        run_bench(out, _fast(dtype="fp16"))
    with pytest.raises(SegpromptError, match="TensorrtExecutionProvider"):
        run_bench(out, _fast(provider="tensorrt"))


def test_ort_model_runs_the_bound_input_it_is_given(lora_onnx):
    from segprompt.measure.ort_bench import OrtModel

    _, out, _ = lora_onnx
    model = OrtModel(out, threads=1)
    assert model.default_size() == (32, 32)  # symbolic: the export size its record names
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 40, 24)
    for x in (a, b, a):  # a new tensor is bound anew; the same one again gives the same logits
        np.testing.assert_allclose(model.predict(x).numpy(), _ort_logits(out, x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_cli_export_then_bench_vs(smoke_run, tmp_path):
    out = tmp_path / "cli.onnx"
    res = run_cli("export", str(smoke_run), "--out", str(out), "--size", "32x32")
    assert res.returncode == 0, res.stderr
    assert "max |diff|" in res.stdout and "argmax agreement 100.000 %" in res.stdout
    assert f"weights of {smoke_run / 'checkpoints' / 'best.pt'} (iteration " in res.stdout  # which weights
    assert f"wrote {out}" in res.stderr and f"wrote {sidecar(out)}" in res.stderr
    res = run_cli("bench", str(out), "--vs", str(smoke_run), "--size", "32x32", "--warmup", "1", "--calib-seconds", "0.02",
                  "--seconds", "0.1", "--chunks", "2", "--threads", "1", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "(ORT)" in res.stdout and "fps ratio cli.onnx (onnxruntime) / run (pytorch)" in res.stdout
