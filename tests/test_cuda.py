"""The CUDA code paths (docs/gpu.md): AMP bf16 and fp16 with the grad scaler, fp16 overflow, pinned
memory, deterministic resume and evaluation against the CPU. Marked ``cuda`` and skipped without
a CUDA device; ``benchmarks/gpu_check.sh`` runs them on a GPU.

``SEGPROMPT_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py`` runs the same tests on the CPU,
which checks the tests themselves where no GPU is at hand (CPU autocast takes bf16 and fp16)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from segprompt.evaluation.evaluate import evaluate_checkpoint
from segprompt.training import launch as train_module
from segprompt.training.launch import train

DEVICE = os.environ.get("SEGPROMPT_TEST_DEVICE", "cuda")
needs_device = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


def _overrides(*more: str) -> list[str]:
    return [f"runtime.device={DEVICE}", "schedule.iters=6", "evaluation.interval=3", "checkpoint.interval=3", *more]


def _records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.cuda
@needs_device
def test_amp_trains_and_saves_the_scaler(recipe, tmp_path, amp):
    run = train(recipe, _overrides(f"runtime.amp={amp}"), out=tmp_path / amp)
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 6
    scale = state["scaler"].get("scale")
    assert (scale is not None and scale > 0) if amp == "fp16" else not state["scaler"]  # bf16 needs no scaler
    result = json.loads((run / "eval.json").read_text())
    assert 0 <= result["mIoU"] <= 100


@pytest.mark.cuda
@needs_device
def test_fp16_overflow_is_skipped_by_the_scaler_not_fatal(recipe, tmp_path, monkeypatch):
    """Gradients that overflow in fp16 make the scaler skip that step and lower its scale; the run
    goes on. (A non-finite *loss* stops the run, as in fp32: docs/runs.md.)"""
    real = torch.amp.GradScaler

    def huge_scale(*args, **kwargs):  # a scale that overflows fp16 gradients at once
        return real(*args, **{**kwargs, "init_scale": 2.0 ** 40})

    monkeypatch.setattr(train_module.torch.amp, "GradScaler", huge_scale)
    run = train(recipe, _overrides("runtime.amp=fp16"), out=tmp_path / "run")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 6 and state["scaler"]["scale"] < 2.0 ** 40  # lowered after skipped steps
    assert all(r.get("event") != "non_finite_loss" for r in _records(run))


@pytest.mark.cuda
@needs_device
def test_batches_are_pinned_and_copied_without_blocking(recipe, tmp_path, monkeypatch):
    seen = []
    real = train_module.DataLoader

    class Spy(real):
        def __iter__(self):
            for batch in super().__iter__():
                seen.append((self.pin_memory, batch["img"].is_pinned()))
                yield batch

    monkeypatch.setattr(train_module, "DataLoader", Spy)
    train(recipe, _overrides("runtime.num_workers=1"), out=tmp_path / "run")
    want = DEVICE == "cuda"  # pinned memory only helps host-to-GPU copies
    assert seen and all(flag == want and pinned == want for flag, pinned in seen[:3]), seen[:3]


@pytest.mark.cuda
@needs_device
def test_deterministic_resume_matches_the_uninterrupted_run(recipe, tmp_path):
    """Resumed at iteration 3 from a kept checkpoint, the run ends where the uninterrupted one did:
    bitwise with ``runtime.deterministic`` on CPU; on a GPU within the tolerance docs/gpu.md states."""
    over = _overrides("runtime.deterministic=true", "checkpoint.keep=2")
    straight = train(recipe, over, out=tmp_path / "straight")
    again = tmp_path / "again"
    shutil.copytree(straight, again)
    (again / "checkpoints" / "last.pt").unlink()
    (again / "checkpoints" / "iter_0000006.pt").unlink()
    train(recipe, over, out=again, resume=str(again / "checkpoints" / "iter_0000003.pt"))
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(again / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= (0.0 if DEVICE == "cpu" else 1e-5), worst


@pytest.mark.cuda
@needs_device
def test_evaluation_on_the_gpu_equals_the_cpu_on_the_same_weights(recipe, tmp_path, synthetic_root):
    run = train(recipe, _overrides(), out=tmp_path / "run")
    _, here = evaluate_checkpoint(run, overrides=[f"runtime.device={DEVICE}"])
    _, cpu = evaluate_checkpoint(run, overrides=["runtime.device=cpu"])
    assert abs(here["mIoU"] - cpu["mIoU"]) <= 0.05 and abs(here["aAcc"] - cpu["aAcc"]) <= 0.05
    for g, c in zip(here["per_class"], cpu["per_class"]):
        assert abs(g["pixels"] - c["pixels"]) == 0  # the labels are the same; only logits may differ in bits


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_without_a_gpu_says_so_and_passes(tmp_path):
    """benchmarks/gpu_check.sh on a machine with no CUDA device: one line saying so, exit 0 (CI
    never needs a GPU), nothing measured."""
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "no CUDA device visible" in res.stdout and "SKIP all: no CUDA device" in res.stdout
    assert not list((tmp_path / "out").glob("bench-*"))
