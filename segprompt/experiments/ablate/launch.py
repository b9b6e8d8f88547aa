"""Launching a plan's unfinished runs: in this process (``local``), under ``torchrun``, or as Slurm
jobs through submitit (``slurm``); the exact command of each run (what ``--plan`` prints)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from segprompt.config import resolve_recipe, shipped_name, shipped_recipes
from segprompt.errors import RunCrashed, RunInterrupted, SegpromptError
from segprompt.experiments.ablate.plan import (
    Plan,
    Run,
    missing_inputs,
    recipe_key,
    refresh_state,
)
from segprompt.experiments.ablate.smoke import load_smoke_profile, prepare_smoke_data
from segprompt.io import atomic_write_json, move_aside
from segprompt.runs import runlock
from segprompt.runs.rundir import CKPT_DIR, LAST
from segprompt.training.launch import train

# Slurm states of a job that will still write to its run directory
_LIVE_JOB_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


def train_cell(recipe: str, overrides: list[str], out: str, load_from: str | None = None) -> str:
    """Start, restart or resume one run in ``out`` (what every launcher executes)."""
    out_dir = Path(out)
    resuming = (out_dir / CKPT_DIR / LAST).is_file()
    return str(train(recipe, overrides, out=out_dir, resume="auto",
                     load_from=None if resuming or load_from is None else load_from))


def _shown(path: Path) -> str:
    """How a printed command names a recipe: a shipped one by its name (it resolves from any working
    directory), else relative to the working directory when inside it, else as given."""
    name = shipped_name(path)
    with contextlib.suppress(SegpromptError):
        if name is not None and resolve_recipe(name).resolve() == Path(path).resolve():
            return name
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def command(run: Run, launcher: str = "local", gpus: int = 1) -> list[str]:
    """The shell command that (re)starts or resumes ``run`` (what ``--plan`` prints)."""
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                  "-m", "segprompt"]
    else:
        prefix = ["segprompt"]
    cmd = [*prefix, "train", _shown(run.recipe)]
    for o in run.overrides:
        cmd += ["--set", o]
    cmd += ["--out", str(run.dir)]
    if run.state in ("interrupted", "started"):
        cmd += ["--resume", "auto"]
    if run.load_from is not None and run.state != "interrupted":
        cmd += ["--load-from", str(run.init_checkpoint)]
    return cmd


class CellJob(submitit.helpers.Checkpointable):
    """A Slurm job of one run. On preemption or time-out submitit requeues the same call, which
    resumes from ``checkpoints/last.pt``. With several tasks, each is one DDP process."""

    def __call__(self, recipe: str, overrides: list[str], out: str, load_from: str | None) -> str:
        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return train_cell(recipe, overrides, out, load_from)


@dataclass
class RunReport:
    launched: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)  # finished already
    failed: list[tuple[Run, str]] = field(default_factory=list)
    submitted: list[tuple[Run, str]] = field(default_factory=list)  # (run, job id)
    waiting: list[tuple[Run, str]] = field(default_factory=list)  # not run: why


def preflight(plan: Plan) -> None:
    """Refuse to start when a recipe, a dataset or a pretrained file is missing (nothing runs)."""
    todo = [r for r in plan.runs if not r.done]
    missing = sorted({recipe_key(r.recipe) for r in todo if r.cfg is None})
    if missing:
        raise SegpromptError(
            f"{plan.table.id}: cannot run cells whose recipe is missing: {', '.join(missing)} (under {shipped_recipes()}). "
            f"Write them, or run the other rows with --rows")
    problems = missing_inputs(plan)
    if problems:
        raise SegpromptError(f"{plan.table.id}: cannot start: " + "; ".join(problems))


def _busy(run: Run, report: RunReport, echo: Callable[[str], None], prefix: str, verb: str) -> bool:
    """Whether another process holds the run's directory (then it waits in ``report``)."""
    busy = runlock.holder(run.dir)
    if busy is not None:
        echo(f"{prefix}{run.label}: running in another process ({busy}); not {verb}")
        report.waiting.append((run, f"running in another process ({busy})"))
    return busy is not None


def run_plan(plan: Plan, *, launcher: str = "local", gpus: int = 1, nodes: int = 1, partition: str | None = None,
             time_min: int = 60 * 24, wait: bool = False, cluster: str = "slurm", echo: Callable[[str], None] = print,
             quiet: bool = True) -> RunReport:
    """Launch every run of ``plan`` that has not finished, dependencies first.

    ``local``: one after another in this process (console output to ``_logs/`` when ``quiet``);
    ``torchrun``: each in ``torch.distributed.run`` with ``gpus`` processes; ``slurm``: one submitit
    job each (``cluster`` "local" or "debug" runs the same submission on this machine)."""
    if launcher not in ("local", "torchrun", "slurm"):
        raise SegpromptError(f"--launcher '{launcher}' is not one of: local, torchrun, slurm")
    preflight(plan)
    if plan.scale == "smoke":
        prepare_smoke_data((r.cfg.data.root for r in plan.runs if r.cfg is not None), load_smoke_profile())
    report = RunReport()
    todo = [r for r in plan.runs if not r.done]
    report.skipped = [r for r in plan.runs if r.done]
    if launcher == "slurm":
        _submit(plan, todo, report, gpus=gpus, nodes=nodes, partition=partition, time_min=time_min, wait=wait,
                cluster=cluster, echo=echo)
        return report
    for i, run in enumerate(todo, 1):
        if run.load_from is not None and not run.load_from.done:
            report.waiting.append((run, f"its initialisation run {run.load_from.label} has not finished"))
            continue
        # the run directory's lock (runlock.py) is what keeps two `ablate`s from running one cell twice
        if _busy(run, report, echo, f"[{i}/{len(todo)}] ", "started"):
            continue
        what = {"missing": "start", "started": "restart", "interrupted": f"resume (iteration {run.iteration})"}
        echo(f"[{i}/{len(todo)}] {what.get(run.state, run.state)} {run.label} -> {run.dir}")
        start = time.perf_counter()
        try:
            if launcher == "local":
                _run_local(plan, run, quiet)
            else:
                _run_torchrun(plan, run, gpus)
        except runlock.RunDirInUse as e:  # it started elsewhere since the check above
            report.waiting.append((run, str(e)))
            echo(f"    not started: {e}")
            continue
        except RunInterrupted as e:
            raise RunInterrupted(f"{e} (or run this `segprompt ablate` again: it resumes {run.label})",
                                 e.signum) from None
        except Exception as e:  # one failed cell must not stop the grid; it is reported at the end
            msg = str(e) if isinstance(e, (SegpromptError, RunCrashed)) else f"{type(e).__name__}: {e}"
            report.failed.append((run, msg))
            echo(f"    failed: {msg}")
            continue
        finally:
            refresh_state(run, plan.root.parent)
        report.launched.append(run)
        echo(f"    {run.state} in {time.perf_counter() - start:.1f}s")
    return report


def log_path(plan: Plan, run: Run) -> Path:
    return plan.root / "_logs" / f"{run.dir.name}.log"


def _run_local(plan: Plan, run: Run, quiet: bool) -> None:
    args = (str(run.recipe), run.overrides, str(run.dir), str(run.init_checkpoint) if run.load_from else None)
    if not quiet:
        train_cell(*args)
        return
    log = log_path(plan, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            train_cell(*args)
        except Exception:
            traceback.print_exc(file=f)
            raise


def _run_torchrun(plan: Plan, run: Run, gpus: int) -> None:
    if run.state == "started" and run.load_from is not None:
        # `train` restarts such a run in place, but its command line cannot combine --resume with
        # --load-from; the folder holds no checkpoint, so it is moved aside (nothing is deleted)
        move_aside(run.dir, "incomplete")
        run.state = "missing"
    log = log_path(plan, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        res = subprocess.run(command(run, "torchrun", gpus), stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if res.returncode != 0:
        raise SegpromptError(f"torchrun exited with status {res.returncode}; see {log}")


def _job_record(plan: Plan, run: Run) -> Path:
    return plan.root / "_jobs" / f"{run.dir.name}.json"


def _live_job(plan: Plan, run: Run) -> str | None:
    """The id of a Slurm job submitted earlier for this run that is still queued or running."""
    path = _job_record(plan, run)
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if rec.get("cluster") != "slurm":
        return None
    job = submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])
    state = job.watcher.get_state(job.job_id, mode="force")  # asks sacct now
    return rec["job_id"] if state in _LIVE_JOB_STATES else None


def _submit(plan: Plan, todo: list[Run], report: RunReport, *, gpus: int, nodes: int, partition: str | None,
            time_min: int, wait: bool, cluster: str, echo: Callable[[str], None]) -> None:
    if cluster == "slurm" and not partition:
        raise SegpromptError("--launcher slurm needs --partition NAME (the Slurm partition to submit to)")
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise SegpromptError("--launcher slurm: no `sbatch`/`srun` on this machine; run ablate on a Slurm login "
                             "node, or use --launcher local / torchrun")
    folder = plan.root / "_submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    tasks = max(gpus, 1)
    executor.update_parameters(name=f"ablate-{plan.table.id}", timeout_min=time_min, nodes=nodes,
                               tasks_per_node=tasks, gpus_per_node=gpus, slurm_partition=partition,
                               slurm_signal_delay_s=120)
    jobs: dict[str, Any] = {}  # run hash -> job submitted now
    job_ids: dict[str, str] = {}  # run hash -> Slurm job id (submitted now, or earlier and still live)
    for run in todo:
        live = _live_job(plan, run) if cluster == "slurm" else None
        if live is not None:
            echo(f"{run.label}: job {live} is still queued or running; not submitted again")
            report.waiting.append((run, f"job {live} still queued or running"))
            job_ids[run.hash] = live
            continue
        if _busy(run, report, echo, "", "submitted"):
            continue
        dep = run.load_from
        extra: dict[str, Any] = {}
        if dep is not None and not dep.done:
            if dep.hash in job_ids and cluster == "slurm":  # Slurm starts it once the first stage succeeded
                extra = {"dependency": f"afterok:{job_ids[dep.hash]}"}
            elif dep.hash in jobs:  # local executor: wait for the initialisation run here
                _wait(jobs[dep.hash], dep, report)
                refresh_state(dep, plan.root.parent)
            if not dep.done and not extra:
                report.waiting.append((run, f"its initialisation run {dep.label} has not finished"))
                continue
        # each task (DDP process) runs the recipe's data-loading workers beside itself
        executor.update_parameters(cpus_per_task=run.cfg.runtime.num_workers + 1)
        if cluster == "slurm":
            executor.update_parameters(slurm_additional_parameters=extra)
        job = executor.submit(CellJob(), str(run.recipe), run.overrides, str(run.dir),
                              str(run.init_checkpoint) if dep is not None else None)
        jobs[run.hash], job_ids[run.hash] = job, str(job.job_id)
        atomic_write_json(_job_record(plan, run), {"job_id": str(job.job_id), "cluster": cluster,
                                                   "folder": str(folder), "dir": str(run.dir),
                                                   "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        report.submitted.append((run, str(job.job_id)))
        echo(f"submitted {run.label} as job {job.job_id} ({cluster}) -> {run.dir}")
    if wait or cluster != "slurm":
        for run, _ in report.submitted:
            _wait(jobs[run.hash], run, report)
            refresh_state(run, plan.root.parent)
            if run.done and run not in report.launched:
                report.launched.append(run)


def _wait(job: Any, run: Run, report: RunReport) -> None:
    try:
        job.result()
    except Exception as e:  # submitit re-raises the job's error with its traceback as text
        if all(r is not run for r, _ in report.failed):
            report.failed.append((run, f"job {job.job_id}: {str(e).strip().splitlines()[-1]}"))
