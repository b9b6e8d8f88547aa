"""How runs end and what they leave: the end-of-run record, failed starts, stale temporaries, one writer.

The process faults (kills, signals, bugs at a chosen call) come from tests/faults.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
from conftest import write_recipe

from segprompt.errors import RunCrashed, RunInterrupted, SegpromptError
from segprompt.io import remove_stale_temporaries, temp_prefix
from segprompt.runs import runlock
from segprompt.training.launch import train


def _events(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _last_log_line(run):
    return (run / "train.log").read_text().splitlines()[-1]


def test_finished_run_records_its_end(recipe, tmp_path):
    run = train(recipe, ["schedule.iters=2", "evaluation.interval=0"], out=tmp_path / "run")
    assert "INFO run ended: finished at iteration 2" in _last_log_line(run)
    assert _events(run)[-1] == {"event": "end", "status": "finished", "iter": 2}


def test_a_refused_start_leaves_nothing_and_an_old_failed_start_does_not_block_its_out(recipe, tmp_path,
                                                                                       monkeypatch):
    run = tmp_path / "run"
    with pytest.raises(SegpromptError, match="does not exist"):
        train(recipe, [f"data.root={tmp_path / 'missing'}"], out=run)
    assert not run.exists()  # the folder this start made is gone: the error said why
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SegpromptError, match="does not exist"):  # a default run folder too
        train(recipe, [f"data.root={tmp_path / 'missing'}"])
    runs = tmp_path / "results" / Path(recipe).stem
    assert not runs.exists() or not any(runs.iterdir())
    # a failed start left by an older segprompt (or a kill) does not block its folder; train.log keeps it above
    run.mkdir()
    (run / "config.yaml").write_text("x: 1\n")
    (run / "train.log").write_text("2026-01-01 00:00:00,000 ERROR run ended: error before training started: old\n")
    train(recipe, ["schedule.iters=2", "evaluation.interval=0"], out=run)
    log = (run / "train.log").read_text()
    assert log.index("error before training started") < log.index("finished at iteration 2")
    assert (run / "checkpoints" / "last.pt").is_file()
    # a folder that holds a trained run (or anything else) still refuses a new run
    with pytest.raises(SegpromptError, match="already exists and is not empty"):
        train(recipe, ["schedule.iters=2"], out=run)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(SegpromptError, match="already exists and is not empty"):
        train(recipe, ["schedule.iters=2"], out=other)
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]  # not even a lock file was left there


def test_unexpected_exception_traceback_goes_to_train_log(recipe, tmp_path, monkeypatch):
    import segprompt.training.loop as engine

    def broken(*args, **kwargs):
        raise RuntimeError("boom in evaluate")

    monkeypatch.setattr(engine, "evaluate", broken)
    run = tmp_path / "run"
    with pytest.raises(RunCrashed, match=r"unexpected RuntimeError: boom in evaluate .*train.log") as e:
        train(recipe, [], out=run)
    assert isinstance(e.value.__cause__, RuntimeError)
    log = (run / "train.log").read_text()
    assert "ERROR run ended: crashed after 3 iteration(s): RuntimeError: boom in evaluate" in log
    assert "Traceback (most recent call last)" in log and "in broken" in log
    assert _events(run)[-1] == {"event": "end", "status": "crashed", "iter": 3}


@pytest.mark.slow
def test_cli_prints_one_line_for_a_crash_and_exits_1(recipe, tmp_path):
    run = tmp_path / "run"
    rc = faults.run("train", str(recipe), "--out", str(run), log=tmp_path / "console.log",
                    fault_spec=faults.fault("segprompt.training.loop:evaluate", error="boom in evaluate"))
    console = (tmp_path / "console.log").read_text()
    assert rc == 1, console
    assert "Traceback" not in console
    assert f"error: unexpected RuntimeError: boom in evaluate (a bug; the traceback is in '{run / 'train.log'}')" \
        in console
    assert "Traceback" in (run / "train.log").read_text()


def test_signal_before_the_first_iteration_saves_nothing_and_says_how_to_start_again(recipe, tmp_path, monkeypatch):
    import segprompt.training.loop as engine

    build = engine.build_model

    def build_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it (or this test process would end)
        return build(*args, **kwargs)

    monkeypatch.setattr(engine, "build_model", build_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted) as e:
        train(recipe, [], out=run)
    assert e.value.signum == signal.SIGTERM
    assert str(e.value) == (f"interrupted at iteration 0, before training started (nothing to save); resume with "
                            f"`segprompt train {recipe} --out {run} --resume auto`")
    assert not (run / "checkpoints" / "last.pt").exists()
    assert "WARNING run ended: interrupted by SIGTERM after 0 iteration(s)" in _last_log_line(run)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back
    monkeypatch.setattr(engine, "build_model", build)
    train(recipe, [], out=run, resume="auto")  # the printed command works
    assert "finished at iteration 6" in _last_log_line(run)


# ------------------------------------------------------------------------------------------------
# leftovers


@pytest.mark.slow
def test_kill_during_checkpoint_save_leaves_a_temporary_the_next_run_removes(recipe, tmp_path):
    run = tmp_path / "run"
    rc = faults.run("train", str(recipe), "--out", str(run), log=tmp_path / "console.log",
                    fault_spec=faults.fault("os:replace", signal.SIGKILL, match="last.pt"))
    assert rc == -signal.SIGKILL
    ckpts = run / "checkpoints"
    left = [p for p in ckpts.iterdir() if p.name.startswith(".last.pt.") and p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].stat().st_size > 0 and not (ckpts / "last.pt").exists()
    live = ckpts / f"{temp_prefix(ckpts / 'best.pt')}live.tmp"  # a live process's write in progress
    remote = ckpts / f".best.pt.~{faults.dead_pid()}@another-host~x.tmp"  # can't tell: kept
    mine = ckpts / "notes.txt"
    for p in (live, remote, mine):
        p.write_text("keep")
    res = subprocess.run([sys.executable, "-m", "segprompt", "train", str(recipe), "--out", str(run), "--resume",
                          "auto"], env=faults.env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not left[0].exists() and live.exists() and remote.exists() and mine.read_text() == "keep"
    assert f"removed 1 temporary file(s) that killed processes left: {left[0].name}" in (run / "train.log").read_text()


@pytest.mark.slow
def test_killed_prepare_synthetic_leaves_a_folder_the_next_prepare_removes(tmp_path):
    out = tmp_path / "prep"
    args = ("prepare", "synthetic", "--out", str(out), "--train", "6", "--val", "2", "--test", "0",
            "--image-size", "32")
    rc = faults.run(*args, log=tmp_path / "console.log", fault_spec=faults.fault("cv2:imwrite", nth=5))
    assert rc == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".prep.") and p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].is_dir() and not out.exists()
    live = tmp_path / f"{temp_prefix(out)}live.tmp"
    live.mkdir()
    res = subprocess.run([sys.executable, "-m", "segprompt", *args], env=faults.env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["console.log", "prep", live.name])


def test_stale_temporaries_are_those_of_dead_processes_on_this_host(tmp_path):
    dead = faults.dead_pid()
    host = socket.gethostname().replace(".", "_")
    names = {f".a.pt.~{dead}@{host}~1.tmp": True, f".a.pt.~{os.getpid()}@{host}~2.tmp": False,
             f".a.pt.~{dead}@elsewhere~3.tmp": False, ".a.pt.old4.tmp": False, "a.pt": False}
    for n in names:
        (tmp_path / n).write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [n for n, stale in names.items() if stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, stale in names.items() if not stale)


# ------------------------------------------------------------------------------------------------
# one writer per run directory


@pytest.mark.slow
def test_a_running_run_refuses_a_second_writer(recipe, tmp_path):
    run = tmp_path / "run"
    proc = faults.start("train", str(recipe), "--out", str(run), "--set", "schedule.iters=300",
                        log=tmp_path / "console.log")
    with faults.reaped(proc):
        assert faults.wait_for(lambda: faults.iterations_logged(run) >= 4, proc)  # last.pt at 3
        for kw in ({}, {"resume": "auto"}, {"resume": str(run)}):
            with pytest.raises(runlock.RunDirInUse, match=re.escape(f"'{run}' is in use by PID {proc.pid} on host ")):
                train(recipe, ["schedule.iters=300"], out=run, **kw)
        assert runlock.holder(run).startswith(f"PID {proc.pid} on host ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 143
    assert runlock.holder(run) is None  # the lock went with the process
    logged = [r["iter"] for r in _events(run) if "loss" in r]
    assert logged == list(range(1, logged[-1] + 1))  # one writer: no interleaved records


@pytest.mark.slow
def test_two_runs_started_together_on_one_out(recipe, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "segprompt", "train", str(recipe), "--out", str(run), "--set", "schedule.iters=4",
            "--set", "evaluation.interval=0"]
    procs = [subprocess.Popen(args, env=faults.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "is in use by PID" in refused or "already exists and is not empty" in refused
    assert [r["iter"] for r in _events(run) if "loss" in r] == [1, 2, 3, 4]


def test_default_run_dirs_of_one_second_do_not_collide(tmp_path, synthetic_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "exp.yaml", synthetic_root)
    second = Path("results/exp/20250101-000000")
    monkeypatch.setattr("segprompt.runs.runplan.default_run_dir", lambda recipe: second)
    held = runlock.lock_run_dir(second)  # a run of this recipe that started in the same second
    try:
        run = train(recipe, ["schedule.iters=1", "evaluation.interval=0"])
    finally:
        held.release()
    assert run == Path("results/exp/20250101-000000-1")
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 1


def test_data_workers_ignore_signals_from_others_and_end_with_the_loader():
    from torch.utils.data import DataLoader

    from segprompt.data.dataset import start_workers, worker_init

    torch.ones(256, 256) @ torch.ones(256, 256)  # thread pools that libraries re-create in a forked child
    before = set(faults._children(os.getpid()))
    loader = DataLoader(list(range(64)), batch_size=2, num_workers=1, worker_init_fn=worker_init,
                        persistent_workers=True)
    batches = start_workers(loader)
    assert next(batches).tolist() == [0, 1]
    [worker] = set(faults._children(os.getpid())) - before
    for sig in ("INT", "TERM"):  # a terminal's Ctrl-C, Slurm's SIGTERM: sent by another process
        subprocess.run(["kill", f"-{sig}", str(worker)], check=True)
    time.sleep(0.5)
    assert next(batches).tolist() == [2, 3] and Path(f"/proc/{worker}").exists()  # still serving
    del batches, loader  # the DataLoader ends its workers (SIGTERM from this process if need be)
    assert faults.wait_for(lambda: not Path(f"/proc/{worker}").exists() or
                           Path(f"/proc/{worker}/stat").read_text().split(") ")[1].startswith("Z"), timeout=30)
