"""How a training run starts and ends (docs/runs.md): ``train()`` is the entry point of
``segprompt train`` and :func:`segprompt.train`.

Rank 0 decides the run directory and locks it for the whole run (:mod:`segprompt.runs.runplan`), the
ranks agree on the plan, temporaries that killed processes left are removed, and the loop
(:mod:`segprompt.training.loop`) runs. ``train.log`` and ``metrics.jsonl`` end with one record of how
the run ended: finished, error, diverged, interrupted (SIGINT/SIGTERM, ``last.pt`` saved, the
command that resumes it) or crashed (a bug; the traceback is in ``train.log``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
from pathlib import Path

from segprompt import distributed as dist_utils
from segprompt.config import load_recipe
from segprompt.errors import (
    USER_OS_ERRORS,
    NonFiniteLoss,
    RunCrashed,
    RunInterrupted,
    SegpromptError,
    os_problem,
)
from segprompt.io import remove_stale_temporaries
from segprompt.runs.load import init_checkpoint
from segprompt.runs.rundir import CKPT_DIR, FILE_ONLY, MetricsLog, setup_logging
from segprompt.runs.runplan import RunPlan, plan_run
from segprompt.training.interrupt import StopSignal
from segprompt.training.loop import Progress, run_loop


def train(recipe: str | Path, overrides: list[str] = (), *, out: str | Path | None = None,
          resume: str | None = None, load_from: str | Path | None = None, load_from_partial: bool = False) -> Path:
    """Run (or resume) one training run; returns its run directory. ``load_from_partial`` lets
    ``load_from`` supply less than ``checkpoint.LOAD_FROM_MIN_SHARE`` of the model's tensors.

    Raises :class:`RunInterrupted` after a SIGINT/SIGTERM (``last.pt`` saved), :class:`SegpromptError`
    for bad input, and :class:`RunCrashed` (on rank 0) for anything unexpected."""
    pre = load_recipe(recipe, overrides)
    if load_from is not None:
        load_from = init_checkpoint(load_from)
    env = dist_utils.init_distributed(pre.runtime.device)
    lock, plan, refused, at = None, None, False, Progress()
    try:
        with StopSignal(env.rank, env.world_size) as stop:
            error = None
            if env.is_main:
                try:
                    plan, lock = plan_run(recipe, overrides, out, resume)
                except SegpromptError as e:
                    error = e
            plan, message = dist_utils.broadcast_object((plan, str(error) if error else None))
            if error:
                raise error
            if message:
                raise SegpromptError(message)

            def command(resume_auto: bool) -> str:
                return _command(recipe, overrides, plan.run_dir, env, resume_auto, load_from)
            try:
                return _train_and_record(plan, env, load_from, load_from_partial, stop, command, at)
            except SegpromptError:
                refused = plan.created and at.iteration is None  # refused before its first iteration
                raise
    finally:
        if lock is not None:
            lock.release()
        if refused and env.is_main:  # a refused start leaves nothing behind (the error says why)
            shutil.rmtree(plan.run_dir, ignore_errors=True)
        dist_utils.cleanup()


def _command(recipe: str | Path, overrides: list[str], run_dir: Path, env: dist_utils.DistEnv, resume_auto: bool,
             load_from: str | Path | None) -> str:
    """The command line that continues this run (or starts it again, when it has no checkpoint)."""
    args = [str(recipe), *(x for o in overrides for x in ("--set", o)), "--out", str(run_dir)]
    args += ["--resume", "auto"] if resume_auto else (["--load-from", str(load_from)] if load_from else [])
    prefix = ["segprompt"]
    if env.distributed:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        nodes = [f"--nnodes={env.world_size // local}"] if env.world_size > local else []
        prefix = ["torchrun", *nodes, f"--nproc-per-node={local}", "-m", "segprompt"]
    return shlex.join([*prefix, "train", *args])


def _train_and_record(plan: RunPlan, env: dist_utils.DistEnv, load_from: str | Path | None, load_from_partial: bool,
                      stop: StopSignal, command, at: Progress) -> Path:
    """Set up the run's log, train, and write to train.log (file only: the CLI prints the console line)
    and metrics.jsonl why the run ended: finished, error, diverged, interrupted or crashed."""
    run_dir = plan.run_dir
    log = setup_logging(run_dir if env.is_main else None, env.is_main)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", enabled=env.is_main)
    if env.is_main:
        if plan.lock_note:
            log.warning(plan.lock_note)
        if plan.note:
            log.info("%s", plan.note)
        removed = remove_stale_temporaries(run_dir) + remove_stale_temporaries(run_dir / CKPT_DIR)
        if removed:
            log.info("removed %d temporary file(s) that killed processes left: %s", len(removed),
                     ", ".join(p.name for p in removed))

    def ended(status: str, message: str, level: int = logging.ERROR, sig: str | None = None) -> None:
        if not env.is_main:
            return
        where = "before training started" if at.iteration is None else f"after {at.iteration} iteration(s)"
        log.log(level, "run ended: %s%s %s: %s", status, f" by {sig}" if sig else "", where, message,
                extra=FILE_ONLY, exc_info=status == "crashed")
        with contextlib.suppress(OSError):
            metrics_log.write(event="end", status=status, iter=at.iteration, **({"signal": sig} if sig else {}))

    try:
        return run_loop(plan, env, load_from, load_from_partial, log, metrics_log, stop, command, at)
    except RunInterrupted as e:
        ended("interrupted", str(e), logging.WARNING, signal.Signals(e.signum).name)
        raise
    except NonFiniteLoss as e:
        ended("diverged", str(e))
        raise
    except SegpromptError as e:
        # a DataLoader worker re-raises with its traceback in the text: keep the message
        ended("error", str(e).rsplit("SegpromptError: ", 1)[-1].strip())
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno in USER_OS_ERRORS:  # a full disk, a permission: not a bug
            ended("error", os_problem(e))
            raise
        ended("crashed", f"{type(e).__name__}: {e}")
        if not env.is_main:  # no train.log on this rank: let the traceback reach the console
            raise
        raise RunCrashed(f"unexpected {type(e).__name__}: {e} (a bug; the traceback is in "
                         f"'{run_dir / 'train.log'}')") from e
    except BaseException as e:  # KeyboardInterrupt outside the main thread, SystemExit
        ended("stopped", type(e).__name__)
        raise
