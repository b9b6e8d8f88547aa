"""segprompt bench: counts and FLOPs of the deployed STDC models, timing knobs, --vs, run directories,
and the STDC rows of count-params."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli

from segprompt.config import dump_recipe, load_recipe
from segprompt.measure import bench as bench_mod
from segprompt.measure.bench import (
    BenchOptions,
    bench_model,
    format_table,
    model_costs,
    run_bench,
)

BASELINE = REPO / "recipes/stdc/cityscapes_stdc1_baseline.yaml"
STAGE2 = REPO / "recipes/stdc/cityscapes_stdc1_stage2.yaml"
FAST = ["--size", "64x128", "--warmup", "1", "--calib-seconds", "0.02", "--seconds", "0.1", "--chunks", "2",
        "--threads", "1", "--device", "cpu"]
KNOBS = ("size", "batch", "device", "device_name", "torch", "dtype", "channels_last", "compile", "compile_mode",
         "threads", "warmup", "calib_iters", "calib_seconds", "seconds", "chunks", "iterations", "chunk_iterations")


def fast_options(**kw) -> BenchOptions:
    return BenchOptions(**{"size": (64, 128), "warmup": 1, "calib_seconds": 0.02, "seconds": 0.1, "chunks": 2,
                           "device": "cpu", **kw})


def test_stdc1_counts_and_flops_at_512x1024():
    cfg = load_recipe(BASELINE)
    model = bench_model(cfg)
    costs = model_costs(model, (512, 1024), ("params", "params_inference", "flops_mmcv"))
    assert round(costs["params"] / 1e6, 3) == 8.573  # every parameter, auxiliary and detail heads included
    assert round(costs["params_inference"] / 1e6, 3) == 8.275  # backbone + context path + decode head
    assert round(costs["flops_mmcv"] / 1e9, 2) == 16.95
    aux = sum(p.numel() for p in model.aux_heads.parameters())
    assert costs["params"] - costs["params_inference"] == aux  # only the training-time heads are left out


def test_stage2_deployed_has_no_clip_encoder():
    from segprompt.models.text.clip_text import CLIPTextEncoder
    from segprompt.models.text.guidance import TextGuidance

    model = bench_model(load_recipe(STAGE2))
    assert model.text_deployed == 1
    assert not any(isinstance(m, CLIPTextEncoder) for m in model.modules())
    assert not any("prompt_learner" in n for n, _ in model.named_parameters())
    (guidance,) = [m for m in model.modules() if isinstance(m, TextGuidance)]
    assert guidance.embeddings.shape == (19, 1024) and guidance.deployed
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == 8.597


def test_vs_alternates_chunks_and_reports_ratio(monkeypatch):
    calls = []
    run = bench_mod._Timed.run

    def recording(self, iters):
        calls.append((id(self), iters))
        return run(self, iters)

    monkeypatch.setattr(bench_mod._Timed, "run", recording)
    result = run_bench(BASELINE, fast_options(chunks=3), vs=STAGE2)
    a, b = result, result["vs"]
    assert a["recipe"].endswith("baseline.yaml") and b["recipe"].endswith("stage2.yaml")
    assert a["params"] == 8572953 and b["params"] > a["params"] and b["text_deployed"] == 1
    for m in (a, b):
        assert m["fps"] > 0 and m["latency_ms"] * m["fps"] == pytest.approx(1000)
        assert len(m["latency_ms_chunks"]) == 3 and m["iterations"] == 3 * m["chunk_iterations"]
    assert result["fps_ratio"] == pytest.approx(a["fps"] / b["fps"])
    # the last 6 runs are the timed chunks: A B A B A B, each model with its own chunk length
    timed = calls[-6:]
    first, second = timed[0][0], timed[1][0]
    assert first != second and [c[0] for c in timed] == [first, second] * 3
    assert {c[1] for c in timed[0::2]} == {a["chunk_iterations"]}
    assert {c[1] for c in timed[1::2]} == {b["chunk_iterations"]}


@pytest.mark.slow
def test_cli_bench_json_records_every_knob_and_guards_out(tmp_path):
    out = tmp_path / "bench.json"
    res = run_cli("bench", str(BASELINE), *FAST, "--json", "--out", str(out))
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    written = json.loads(out.read_text())
    assert printed == written
    assert all(k in written for k in KNOBS), [k for k in KNOBS if k not in written]
    assert written["size"] == [64, 128] and written["threads"] == 1 and written["dtype"] == "fp32"
    assert written["device"] == "cpu" and written["warmup"] == 1 and written["chunks"] == 2
    assert written["fps"] > 0 and written["latency_ms_std"] >= 0 and written["iterations"] >= 2
    assert written["params"] == 8572953 and written["params_inference"] == 8275123
    assert 0 < written["flops_mmcv"] < written["flops_torch"]  # torch counts 2 per multiply-add
    assert written["class_names"] == "placeholder" and written["num_classes"] == 19
    # an existing --out is never overwritten without --force (checked before measuring)
    before = out.read_bytes()
    res = run_cli("bench", str(BASELINE), *FAST, "--out", str(out))
    assert res.returncode == 2 and "--force" in res.stderr and str(out) in res.stderr
    assert out.read_bytes() == before
    res = run_cli("bench", str(BASELINE), "--size", "512by1024")
    assert res.returncode == 2 and "512by1024" in res.stderr and "HxW" in res.stderr
    res = run_cli("bench", str(BASELINE), "--compile-mode", "fast")
    assert res.returncode == 2 and "--compile-mode 'fast' is not one of: default, reduce-overhead" in res.stderr


@pytest.mark.slow  # torch.compile takes about half a minute on 2 CPU cores
def test_compile_mode_is_applied_and_recorded(tmp_path):
    opts = BenchOptions(size=(32, 32), device="cpu", compile=True, compile_mode="reduce-overhead", warmup=2,
                        calib_seconds=0.05, seconds=0.2, chunks=2, threads=1)
    result = run_bench("smoke", opts, ["data.num_classes=4"])
    assert result["compile"] and result["compile_mode"] == "reduce-overhead" and result["fps"] > 0
    assert "compiled (reduce-overhead)" in str(format_table(result).title)


@pytest.mark.slow
def test_run_directory_gets_bench_json_and_history(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_recipe(load_recipe(BASELINE)))
    res = run_cli("bench", str(run), *FAST)
    assert res.returncode == 0, res.stderr
    assert "FPS" in res.stdout and "wrote" in res.stderr
    first = json.loads((run / "bench.json").read_text())
    assert first["recipe"] == str(run) and first["params"] == 8572953
    res = run_cli("bench", str(run), *FAST, "--chunks", "3")
    assert res.returncode == 0, res.stderr
    history = list((run / "bench_history").iterdir())
    assert len(history) == 1 and json.loads(history[0].read_text()) == first
    assert json.loads((run / "bench.json").read_text())["chunks"] == 3


def test_recipe_costs_default_size_is_the_papers():
    cfg = load_recipe(REPO / "recipes/stdc/camvid_stdc1_baseline.yaml")
    assert bench_mod.default_size(cfg) == (720, 960)
    costs = model_costs(bench_model(cfg), bench_mod.default_size(cfg), keys=("flops_mmcv",))
    assert round(costs["flops_mmcv"] / 1e9, 2) == 22.40  # K=11 at 720x960 (the paper's 22.42 is K=19)


@pytest.mark.slow
def test_count_params_json_has_stdc_rows():
    res = run_cli("count-params", "--json")
    assert res.returncode == 0, res.stderr
    rows = [r for r in json.loads(res.stdout) if r["paper"] == "stdc"]
    assert {"paper", "table", "row", "column", "ours", "paper_value", "match", "reason", "recipe"} <= set(rows[0])
    got = {(r["table"], r["row"], r["column"]): r for r in rows}
    assert len(got) == 12  # Tables 1 and 2: three rows x (#Params, FLOPs)
    expected = {("1", "STDC1-Seg50 (baseline)", "#Params (M)"): 8.57, ("1", "Ours (stage 2)", "#Params (M)"): 8.60,
                ("1", "STDC1-Seg50 (baseline)", "FLOPs (G)"): 16.95, ("1", "Ours (stage 1)", "FLOPs (G)"): 16.96,
                ("2", "STDC1-Seg (baseline)", "FLOPs (G)"): 22.40, ("2", "Ours (stage 2)", "#Params (M)"): 8.58,
                ("2", "Ours (stage 2)", "FLOPs (G)"): 22.41}
    for key, ours in expected.items():
        assert got[key]["ours"] == ours, key
    mismatched = {k for k, r in got.items() if not r["match"]}
    assert mismatched == {("2", "STDC1-Seg (baseline)", "FLOPs (G)"), ("2", "Ours (stage 1)", "#Params (M)"),
                          ("2", "Ours (stage 1)", "FLOPs (G)"), ("2", "Ours (stage 2)", "#Params (M)"),
                          ("2", "Ours (stage 2)", "FLOPs (G)")}
    assert all("docs/stdc_clip.md" in got[k]["reason"] for k in mismatched)
    assert all(r["reason"] is None for k, r in got.items() if k not in mismatched)


def test_the_vs_ratio_is_worded_and_few_timed_iterations_are_flagged():
    from segprompt.measure.bench import MIN_TIMED_ITERATIONS, comparison_lines

    a = {"recipe": "a.yaml", "engine": "pytorch", "iterations": 400}
    result = {**a, "fps_ratio": 0.25, "vs": {"recipe": "b.onnx", "engine": "onnxruntime", "iterations": 10}}
    lines = comparison_lines(result)
    assert lines[0] == ("fps ratio a.yaml (pytorch) / b.onnx (onnxruntime): 0.250, i.e. b.onnx (onnxruntime) is "
                        "4.00x faster than a.yaml (pytorch)")
    assert len(lines) == 2 and lines[1].startswith("warning: b.onnx was timed over only 10 iterations")
    assert comparison_lines({**a, "iterations": MIN_TIMED_ITERATIONS}) == []
