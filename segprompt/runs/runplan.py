"""Where a ``segprompt train`` goes and what it resumes from: ``--out``, ``--resume auto|PATH`` and the
default ``results/<recipe>/<timestamp>/``, each decided holding the run directory's lock
(``docs/runs.md``), so two processes never both start, restart or resume one run."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from segprompt.config import Recipe, config_diff, load_recipe
from segprompt.errors import SegpromptError
from segprompt.runs.rundir import (
    CKPT_DIR,
    CONFIG,
    LAST,
    check_new_run_dir,
    default_run_dir,
    failed_start,
    find_latest_run,
    new_run_dir,
)
from segprompt.runs.runlock import LOCK, RunDirInUse, RunLock, lock_run_dir


@dataclass
class RunPlan:
    run_dir: Path
    cfg: Recipe
    resume_from: Path | None
    note: str | None = None  # logged once the run's log is open
    lock_note: str | None = None  # the run directory could not be locked (see runlock.py)
    created: bool = False  # this start made the folder: a refused start removes it again (training/launch.py)


def _check_same_config(saved: Recipe, now: Recipe, run_dir: Path) -> None:
    diff = config_diff(saved, now)
    if diff:
        raise SegpromptError(
            f"cannot resume '{run_dir}': the recipe differs from the run's {CONFIG} (run vs now: {diff}). Resume "
            f"with the same recipe and --set values, or start a new run (a new --out)")


def plan_run(recipe: str | Path, overrides: list[str], out: str | Path | None,
             resume: str | None) -> tuple[RunPlan, RunLock]:
    """Decide the run directory and the checkpoint to resume from (rank 0 only).

    Every decision is taken holding the directory's lock, which the caller keeps for the run, so
    two processes never both start, restart or resume one run."""
    cfg = load_recipe(recipe, overrides)
    if resume is None:
        if out is None:
            return _new_default_run(recipe, cfg)
        run_dir = Path(out)
        if not (run_dir / LOCK).is_file():
            check_new_run_dir(run_dir)  # a folder that is not a run gets no lock file
        created = not run_dir.exists()
        return _locked(run_dir, lambda: RunPlan(new_run_dir(run_dir), cfg, None, created=created))
    if resume == "auto":
        run_dir = Path(out) if out else find_latest_run(recipe)
        if run_dir is None:
            plan, lock = _new_default_run(recipe, cfg)
            plan.note = (f"--resume auto: no run with a checkpoint in '{default_run_dir(recipe).parent}'; "
                         f"starting a new run in '{plan.run_dir}'")
            return plan, lock
        if not (run_dir / CONFIG).is_file() and not (run_dir / LOCK).is_file():
            check_new_run_dir(run_dir)
        return _locked(run_dir, lambda: _plan_auto(run_dir, cfg))
    p = Path(resume)
    ckpt_path = p / CKPT_DIR / LAST if p.is_dir() else p
    if not ckpt_path.is_file():
        raise SegpromptError(f"--resume '{resume}': no checkpoint at '{ckpt_path}'")
    run_dir = ckpt_path.parent.parent
    if out and Path(out).resolve() != run_dir.resolve():
        raise SegpromptError(f"--resume '{resume}' belongs to run '{run_dir}', not --out '{out}'")

    def resume_path() -> RunPlan:
        if (run_dir / CONFIG).is_file():
            _check_same_config(load_recipe(run_dir / CONFIG), cfg, run_dir)
        return RunPlan(run_dir, cfg, ckpt_path)
    return _locked(run_dir, resume_path)


def _plan_auto(run_dir: Path, cfg: Recipe) -> RunPlan:
    last = run_dir / CKPT_DIR / LAST
    if last.is_file():
        if (run_dir / CONFIG).is_file():
            _check_same_config(load_recipe(run_dir / CONFIG), cfg, run_dir)
        return RunPlan(run_dir, cfg, last)
    if (run_dir / CONFIG).is_file() and not failed_start(run_dir):
        # the run died before its first checkpoint: start it again in the same place
        _check_same_config(load_recipe(run_dir / CONFIG), cfg, run_dir)
        return RunPlan(run_dir, cfg, None, f"--resume auto: '{run_dir}' has no checkpoint yet; "
                                           f"starting it again from iteration 0")
    return RunPlan(new_run_dir(run_dir), cfg, None, f"--resume auto: no run with a checkpoint in '{run_dir}'; "
                                                    f"starting a new run there")


def _locked(run_dir: Path, decide) -> tuple[RunPlan, RunLock]:
    lock = lock_run_dir(run_dir)
    try:
        plan = decide()
    except BaseException:
        lock.release()
        raise
    plan.lock_note = lock.note
    return plan, lock


def _new_default_run(recipe: str | Path, cfg: Recipe) -> tuple[RunPlan, RunLock]:
    """A new ``results/<recipe>/<timestamp>[-k]/``: runs of one recipe started in the same second
    (a job array) each get their own."""
    base = default_run_dir(recipe)
    for k in itertools.count():
        run_dir = base.with_name(f"{base.name}-{k}") if k else base
        if run_dir.exists():
            continue
        try:
            return _locked(run_dir, lambda: RunPlan(new_run_dir(run_dir), cfg, None, created=True))
        except RunDirInUse:
            continue
