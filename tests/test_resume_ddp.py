"""Exact resume after SIGKILL and after SIGINT/SIGTERM, and DDP (2 gloo processes) against one process.

These run the real CLI in subprocesses, as a user (or torchrun) would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import faults
import pytest
import torch
from conftest import REPO, run_cli, write_recipe

DETERMINISTIC = ["runtime.deterministic=true", "schedule.iters=12", "checkpoint.interval=4",
                 "evaluation.interval=6", "checkpoint.keep=2"]


def _last(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def _assert_same_tensors(a, b, exact=True):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same_tensors(a[k], b[k], exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tensors(x, y, exact)
    elif isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    else:
        assert a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(tmp / "tiny.yaml", synthetic_root)
    res = run_cli("train", str(recipe), "--out", str(tmp / "run"), *sum((["--set", s] for s in DETERMINISTIC), []))
    assert res.returncode == 0, res.stderr
    return recipe, tmp / "run"


def _iters_logged(run) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((r["iter"] for r in lines if "loss" in r), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [2, 5, 9])
def test_resume_after_sigkill_is_bitwise_identical(uninterrupted, tmp_path, kill_after):
    recipe, ref = uninterrupted
    run = tmp_path / "run"
    args = [sys.executable, "-m", "segprompt", "train", str(recipe), "--out", str(run),
            *sum((["--set", s] for s in DETERMINISTIC), [])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _iters_logged(run) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _iters_logged(run) < 12, "the run finished before it could be killed"
    # resume with another number of data workers: the data order must not depend on it
    res = run_cli("train", str(recipe), "--out", str(run), "--resume", "auto",
                  *sum((["--set", s] for s in DETERMINISTIC), []), "--set", "runtime.num_workers=1")
    assert res.returncode == 0, res.stderr
    _assert_same_final_checkpoint(ref, run)
    kept = sorted(p.name for p in (run / "checkpoints").glob("iter_*.pt"))
    assert kept == ["iter_0000008.pt", "iter_0000012.pt"]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(uninterrupted, tmp_path, synthetic_root):
    recipe = write_recipe(tmp_path / "tiny.yaml", synthetic_root)
    # dropout off: its masks come from per-rank RNG streams, which differ by design
    common = ["--set", "schedule.iters=4", "--set", "evaluation.interval=0", "--set", "checkpoint.interval=4",
              "--set", "model.decode_head.dropout=0", "--set", "model.aux_heads.0.dropout=0"]
    one = run_cli("train", str(recipe), "--out", str(tmp_path / "one"), *common)
    assert one.returncode == 0, one.stderr
    two = run_cli("train", str(recipe), "--out", str(tmp_path / "two"), *common, torchrun=2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert json.loads((tmp_path / "two" / "env.json").read_text())["world_size"] == 2
    a, b = _last(tmp_path / "one"), _last(tmp_path / "two")
    # SyncBN statistics and gradients over the same global batch: equal up to float summation order
    _assert_same_tensors(a["model"], b["model"], exact=False)
    assert len(b["rng"]) == 2  # every rank's RNG state is kept for resume


@pytest.mark.slow
def test_distributed_evaluation_matches_single_process(uninterrupted, tmp_path):
    _, run = uninterrupted
    single = run_cli("eval", str(run), "--checkpoint", "last")
    assert single.returncode == 0, single.stderr
    r1 = json.loads((run / "eval.json").read_text())
    dist = run_cli("eval", str(run), "--checkpoint", "last", torchrun=2)
    assert dist.returncode == 0, dist.stdout + dist.stderr
    r2 = json.loads((run / "eval.json").read_text())
    assert r1["images"] == r2["images"] == 7  # odd count: nothing dropped, nothing duplicated
    assert r1["per_class"] == r2["per_class"]  # pixel counts and IoUs identical
    for k in ("aAcc", "mIoU", "mAcc", "mDice", "mFscore"):
        assert r1[k] == r2[k]


def _train_args(recipe, run, *extra):
    return ("train", str(recipe), "--out", str(run), *sum((["--set", s] for s in DETERMINISTIC), []), *extra)


def _assert_resumes_exactly(recipe, run, ref, stopped_at):
    """``--resume auto`` from the interrupt's last.pt ends bitwise equal to the uninterrupted run."""
    assert _last(run)["iteration"] == stopped_at
    res = run_cli(*_train_args(recipe, run, "--resume", "auto"))
    assert res.returncode == 0, res.stderr
    _assert_same_final_checkpoint(ref, run)


def _assert_same_final_checkpoint(ref, run):
    """The resumed run's last.pt is bitwise the uninterrupted run's: iteration 12, weights,
    optimizer state and best score."""
    a, b = _last(ref), _last(run)
    assert a["iteration"] == b["iteration"] == 12
    _assert_same_tensors(a["model"], b["model"])
    _assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"])
    assert a["best"] == b["best"]


@pytest.mark.slow
def test_sigint_saves_at_the_iteration_boundary_and_resumes_exactly(uninterrupted, tmp_path):
    recipe, ref = uninterrupted
    run = tmp_path / "run"
    # Ctrl-C while iteration 6 evaluates: 6 is no checkpoint.interval (4) iteration, so last.pt is the interrupt's
    rc = faults.run(*_train_args(recipe, run), log=tmp_path / "console.log",
                    fault_spec=faults.fault("segprompt.training.loop:evaluate", signal.SIGINT))
    console = (tmp_path / "console.log").read_text()
    assert rc == 130, console
    line = f"interrupted at iteration 6; resume with `segprompt train {recipe} --set runtime.deterministic=true"
    assert line in console and f"--out {run} --resume auto`" in console
    log = (run / "train.log").read_text().splitlines()
    assert "run ended: interrupted by SIGINT after 6 iteration(s)" in log[-1] and line in log[-1]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) == {
        "event": "end", "status": "interrupted", "iter": 6, "signal": "SIGINT"}
    _assert_resumes_exactly(recipe, run, ref, 6)


@pytest.mark.slow
def test_sigterm_to_every_process_stops_at_the_next_iteration_and_resumes_exactly(uninterrupted, tmp_path):
    recipe, ref = uninterrupted
    run = tmp_path / "run"
    # with a data worker: Slurm sends SIGTERM to every process of the job before it kills them
    proc = faults.start(*_train_args(recipe, run, "--set", "runtime.num_workers=1"), log=tmp_path / "console.log")
    with faults.reaped(proc):
        faults.signal_after(proc, run, 2, signal.SIGTERM, children=True)
        assert proc.wait(120) == 143, (tmp_path / "console.log").read_text()
    console = (tmp_path / "console.log").read_text()
    assert "SIGTERM received; stopping at the next iteration boundary" in console
    assert "(Ctrl-C (SIGINT) or SIGKILL quits at once" in console and "Ctrl-C again" not in console
    assert "\n\nsegprompt" not in console  # off a terminal, no empty line before the notice
    stopped = int((tmp_path / "console.log").read_text().split("interrupted at iteration ")[1].split(";")[0])
    assert 2 <= stopped < 12
    _assert_resumes_exactly(recipe, run, ref, stopped)


@pytest.mark.slow
def test_second_ctrl_c_quits_at_once_without_saving(uninterrupted, tmp_path):
    recipe, _ = uninterrupted
    run = tmp_path / "run"
    rc = faults.run(*_train_args(recipe, run), log=tmp_path / "console.log",
                    fault_spec=faults.fault("segprompt.training.loop:evaluate", signal.SIGINT, times=2))
    assert rc == -signal.SIGINT  # killed by the signal, as the shell reports with 130
    assert "Ctrl-C again quits at once" in (tmp_path / "console.log").read_text()
    assert _last(run)["iteration"] == 4  # the interval checkpoint before; nothing saved at 6


@pytest.mark.slow
def test_ddp_ranks_agree_to_stop_when_one_rank_gets_sigterm(tmp_path, synthetic_root):
    recipe = write_recipe(tmp_path / "tiny.yaml", synthetic_root)
    run = tmp_path / "run"
    proc = faults.start(*_train_args(recipe, run), log=tmp_path / "console.log", torchrun=2)
    with faults.reaped(proc):
        faults.signal_after(proc, run, 2, signal.SIGTERM, pid=faults.child_with_rank(proc.pid, 1))
        proc.wait(180)  # rank 0 would wait forever in its next collective if rank 1 stopped alone
    console = (tmp_path / "console.log").read_text()
    assert proc.returncode != 0, console
    stopped = _last(run)["iteration"]
    assert 2 <= stopped < 12 and len(_last(run)["rng"]) == 2
    assert f"interrupted at iteration {stopped}; resume with `torchrun --nproc-per-node=2 -m segprompt train" in console
    assert f"interrupted by SIGTERM after {stopped} iteration(s)" in (run / "train.log").read_text()
