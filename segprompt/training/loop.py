"""The training loop: iteration-based, one code path for CPU, one GPU and DDP under torchrun.

Read top to bottom: set up the process group and the run directory, build the model (tuning
method applied, so frozen parameters are frozen before DDP wraps it), the optimizer, the poly
schedule and the resumable sampler, restore a checkpoint if resuming, then loop: accumulate
gradients over micro-batches, check the loss is finite on every rank, clip, step, log, evaluate
every ``evaluation.interval`` iterations (keeping the best checkpoint) and write
``checkpoints/last.pt`` every ``checkpoint.interval`` iterations.

Resuming restores the model, optimizer, scheduler, grad scaler, iteration, data order (the
sampler restarts at the saved step) and every RNG state of every rank, so on CPU in
deterministic mode a resumed run ends bitwise identical to an uninterrupted one.

The run's lifecycle (docs/runs.md): rank 0 locks the run directory for the whole run and removes
temporaries that killed processes left in it; SIGINT/SIGTERM stop the loop at the next iteration
boundary with ``last.pt`` saved; ``train.log`` ends with one line saying how the run ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shlex
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from segprompt.config import Recipe, dump_recipe, load_recipe
from segprompt.data.dataset import collate, start_workers, worker_init
from segprompt.data.sampler import TrainBatchSampler
from segprompt.data.transforms import normalize
from segprompt.runs import checkpoint as ckpt
from segprompt import distributed as dist_utils
from segprompt.build import build_eval_dataset, build_model, build_segmentor, build_train_dataset, dataset_meta
from segprompt.evaluation.evaluate import evaluate
from segprompt.evaluation.inference import autocast
from segprompt.training.interrupt import StopSignal
from segprompt.runs.load import init_checkpoint
from segprompt.evaluation.metrics import format_table, summary_line
from segprompt.training.optim import build_optimizer, build_scheduler
from segprompt.runs.rundir import (
    BEST,
    CKPT_DIR,
    DEPLOYED,
    FILE_ONLY,
    LAST,
    MetricsLog,
    environment,
    setup_logging,
    write_run_files,
)
from segprompt.runs.runplan import RunPlan, plan_run
from segprompt.training.tensorboard import TensorBoardLog
from segprompt.errors import USER_OS_ERRORS, NonFiniteLoss, RunCrashed, RunInterrupted, SegpromptError, os_problem
from segprompt.io import atomic_write_json, remove_stale_temporaries
from segprompt.models.text.guidance import deploy_text, has_learned_text
from segprompt.progress import progress_bar
from segprompt.tuning.base import full_share


def seed_everything(seed: int, deterministic: bool, benchmark: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = benchmark


def _micro_batch(cfg: Recipe, world: int) -> int:
    g, acc = cfg.data.batch_size, cfg.optimizer.accum_steps
    if acc < 1 or g % (world * acc):
        raise SegpromptError(
            f"data.batch_size {g} (the global batch) is not divisible by world size {world} x "
            f"optimizer.accum_steps {acc}; change one of them")
    return g // (world * acc)


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
    lock = None
    try:
        with StopSignal(env.rank, env.world_size) as stop:
            plan = None
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
            return _train_and_record(plan, env, load_from, load_from_partial, stop, command)
    finally:
        if lock is not None:
            lock.release()
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


@dataclass
class _Progress:
    iteration: int | None = None  # None until the loop starts


def _train_and_record(plan: RunPlan, env: dist_utils.DistEnv, load_from: str | Path | None, load_from_partial: bool,
                      stop: StopSignal, command) -> Path:
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
    at = _Progress()

    def ended(status: str, message: str, level: int = logging.ERROR, sig: str | None = None) -> None:
        if not env.is_main:
            return
        where = "before training started" if at.iteration is None else f"after {at.iteration} iteration(s)"
        log.log(level, "run ended: %s%s %s: %s", status, f" by {sig}" if sig else "", where, message,
                extra=FILE_ONLY, exc_info=status == "crashed")
        with contextlib.suppress(OSError):
            metrics_log.write(event="end", status=status, iter=at.iteration, **({"signal": sig} if sig else {}))

    try:
        return _train(plan, env, load_from, load_from_partial, log, metrics_log, stop, command, at)
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


def _train(plan: RunPlan, env: dist_utils.DistEnv, load_from: str | Path | None, load_from_partial: bool, log,
           metrics_log: MetricsLog, stop: StopSignal, command, at: _Progress) -> Path:
    cfg, run_dir = plan.cfg, plan.run_dir
    seed_everything(cfg.runtime.seed + env.rank, cfg.runtime.deterministic, cfg.runtime.cudnn_benchmark)
    if env.is_main:
        write_run_files(run_dir, dump_recipe(cfg), environment(env.world_size, cfg.runtime.seed, env.device))
    meta = dataset_meta(cfg)
    micro = _micro_batch(cfg, env.world_size)

    model = build_model(cfg, meta)
    if load_from:
        loaded, total, dropped, reshaped = ckpt.load_init(model, load_from, partial=load_from_partial)
        log.info("loaded weights from %s: %d of the model's %d tensors (iteration counter starts at 0)%s%s",
                 load_from, loaded, total,
                 f"; skipped {len(dropped)} tensor(s) this model does not have: {dropped[:8]}" if dropped else "",
                 f"; {len(reshaped)} tensor(s) of other shapes start from their initial values (re-initialised): "
                 f"{reshaped}" if reshaped else "")
    model.to(env.device)
    if env.distributed:
        model = dist_utils.convert_sync_batchnorm(model, env.device)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    amp = cfg.runtime.amp
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == "fp16")
    if amp == "bf16" and env.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SegpromptError("runtime.amp is 'bf16' but this GPU does not support bfloat16; use fp16")

    start_iter, best = 0, None
    rng_states = None
    if plan.resume_from is not None:
        state = ckpt.load_run_checkpoint(plan.resume_from, resume=True)
        ckpt.check_frozen_source(state, cfg.model.pretrained, str(plan.resume_from))
        ckpt.restore_frozen(model, state, str(plan.resume_from))
        ckpt.load_model_state(model, state["model"], str(plan.resume_from))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_iter, best, rng_states = state["iteration"], state["best"], state["rng"]
        log.info("resumed %s at iteration %d", plan.resume_from, start_iter)
        metrics_log.write(event="resume", iter=start_iter, checkpoint=str(plan.resume_from))
    tb = TensorBoardLog(run_dir, cfg, write=env.is_main, first_iter=start_iter)  # runtime.tensorboard

    net = model
    if env.distributed:
        net = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                      find_unused_parameters=cfg.runtime.find_unused_parameters)
    dataset = build_train_dataset(cfg, meta)
    val_set = build_eval_dataset(cfg, meta)
    sampler = TrainBatchSampler(len(dataset), micro, world_size=env.world_size, rank=env.rank,
                                accum_steps=cfg.optimizer.accum_steps, seed=cfg.runtime.seed, start_step=start_iter)
    nw = cfg.runtime.num_workers
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=nw, collate_fn=collate, worker_init_fn=worker_init,
                        pin_memory=env.device.type == "cuda", persistent_workers=nw > 0,
                        generator=torch.Generator())
    batches = start_workers(loader)
    if rng_states is not None:
        if len(rng_states) == env.world_size:
            ckpt.set_rng_state(rng_states[env.rank])
        else:
            log.warning("checkpoint holds RNG states of %d ranks, this run has %d: data order is exact, "
                        "random layers (dropout) are not", len(rng_states), env.world_size)

    iters, ev = cfg.schedule.iters, cfg.evaluation
    trainable = [p for p in model.parameters() if p.requires_grad]
    # "% of full" as count-params and the demo compute it (docs/measurement.md): against full tuning's
    # network, built again on the meta device (no memory) with nothing inserted or frozen
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        share = full_share(model, build_segmentor(cfg, meta, load_pretrained=False).parameters())
    log.info("run %s | %d process(es) on %s | global batch %d = %d x %d micro x %d accum | "
             "trainable %s parameters = %.2f%% of full tuning's %s", run_dir, env.world_size, env.device,
             cfg.data.batch_size, env.world_size, micro, cfg.optimizer.accum_steps, f"{share.trainable:,}",
             share.percent, f"{share.full:,}")

    # a model with nothing frozen (full tuning, learn-from-scratch) needs no frozen-weights file
    frozen = any(not p.requires_grad for p in model.parameters())
    frozen_from = cfg.model.pretrained if frozen else None
    # frozen weights initialised from another run's checkpoint come from that file (kept on resume)
    init_from = load_from if frozen and load_from else None
    if frozen and plan.resume_from is not None and state.get("frozen_source", {}).get("init"):
        init_from = state["frozen_source"]["init"]["path"]

    travel = ckpt.travel_record(meta)
    saved = {LAST: start_iter} if plan.resume_from is not None else {}  # name -> iteration on disk
    if best is not None:
        saved[BEST] = best["iter"]

    def save(name: str, iteration: int) -> None:
        states = dist_utils.all_gather_object(ckpt.rng_state())
        if env.is_main:
            path = run_dir / CKPT_DIR / name
            try:
                ckpt.save_checkpoint(
                    path, model=ckpt.model_state(model, cfg.checkpoint.save_full_model),
                    full_model=cfg.checkpoint.save_full_model,
                    frozen_source=ckpt.frozen_source(frozen_from, cfg.runtime.seed, init_from),
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                    iteration=iteration, best=best, rng=states, config=cfg.to_dict(), **travel)
            except OSError as e:  # the write is atomic: the file on disk is the previous one
                kept = (f"the previous '{name}' (iteration {saved[name]}) is intact"
                        if name in saved and path.is_file() else f"no earlier '{name}' was written")
                raise SegpromptError(f"checkpoint of iteration {iteration} not saved: "
                                     f"{os_problem(e, path, hint=False)}; {kept}. Free space (or fix what the error "
                                     f"names), then continue with `{command(True)}`"
                                     ) from None
            saved[name] = iteration
        dist_utils.barrier()

    skipped: set[str] = set()
    net.train()
    t_log = time.perf_counter()
    with progress_bar(env.is_main) as bar, tb, warnings.catch_warnings():
        # fp16: a step the scaler skipped (overflowing gradients) makes torch warn that the schedule
        # stepped without the optimizer; the schedule follows iterations, as intended (docs/gpu.md). Set
        # once for the loop: a catch_warnings per iteration would reset every warning's "shown once" state
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        task = bar.add_task("train", total=iters, completed=start_iter, info="")
        for step in range(start_iter, iters):
            at.iteration = step
            signum = stop.received(env.device)  # every rank, every iteration (interrupt.py)
            if signum:
                if step > start_iter and step % cfg.checkpoint.interval:
                    save(LAST, step)  # not saved at this iteration yet
                saved = step > start_iter or plan.resume_from is not None
                where = f"interrupted at iteration {step}"
                where += "" if saved else ", before training started (nothing to save)"
                if saved or not load_from:  # --resume auto also restarts a run that has no checkpoint
                    raise RunInterrupted(f"{where}; resume with `{command(True)}`", signum)
                raise RunInterrupted(f"{where}; start it again with `{command(False)}`", signum)  # with --load-from
            optimizer.zero_grad(set_to_none=True)
            parts: dict[str, torch.Tensor] = {}
            for k in range(cfg.optimizer.accum_steps):
                batch = next(batches)
                skipped.update(batch["skipped"])
                img = normalize(batch["img"].to(env.device, non_blocking=True), cfg.data.mean, cfg.data.std)
                label = batch["label"].to(env.device, non_blocking=True)
                # the part of the original image each crop covers, so SPM's M0 follows the crop (docs/spm.md)
                view = batch["view"].to(env.device, non_blocking=True) if "view" in batch else None
                last_micro = k == cfg.optimizer.accum_steps - 1
                sync = net.no_sync() if (env.distributed and not last_micro) else contextlib.nullcontext()
                with sync:
                    with autocast(env.device, amp):
                        losses = net(img, label, view=view)
                    loss = sum(losses.values()) / cfg.optimizer.accum_steps
                    scaler.scale(loss).backward()
                for name, v in losses.items():
                    parts[name] = parts.get(name, 0.0) + v.detach().float() / cfg.optimizer.accum_steps
            values = dist_utils.all_reduce_mean(torch.stack([sum(parts.values()), *parts.values()]))
            if not torch.isfinite(values).all():
                last = run_dir / CKPT_DIR / LAST
                metrics_log.write(event="non_finite_loss", iter=step + 1,
                                  **{n: float(v) for n, v in zip(["loss", *parts], values.tolist())})
                raise NonFiniteLoss(
                    f"non-finite loss at iteration {step + 1} ({', '.join(f'{n}={v:.4g}' for n, v in zip(['loss', *parts], values.tolist()))}); "
                    f"training stopped without saving. "
                    + (f"The last good checkpoint is '{last}' (iteration {ckpt.load_checkpoint(last)['iteration']})"
                       if last.is_file() else "No checkpoint was saved before it")
                    + ". Lower optimizer.lr, set optimizer.grad_clip, or check the data")
            if cfg.optimizer.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.optimizer.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            done = at.iteration = step + 1

            lr = optimizer.param_groups[0]["lr"]
            info = f"loss {values[0]:.4f} lr {lr:.2e}"
            bar.update(task, completed=done, info=info)
            if done % cfg.runtime.log_interval == 0 or done == iters:
                dt = time.perf_counter() - t_log
                t_log = time.perf_counter()
                record = {"iter": done, "lr": lr, "loss": float(values[0]),
                          **{n: float(v) for n, v in zip(parts, values[1:].tolist())}, "time": dt}
                for provider in model.loss_providers:  # e.g. the SPMs' prompt sizes and gradient norms
                    if hasattr(provider, "diagnostics"):
                        record.update(provider.diagnostics())
                metrics_log.write(**record)
                tb.scalars(done, record)
                log.info("iter %d/%d %s", done, iters, info)

            if (ev.interval and done % ev.interval == 0) or done == iters:
                result = evaluate(model, val_set, cfg, env, show_progress=False)
                value = result.get(ev.metric)
                if value is None:
                    raise SegpromptError(f"evaluation.metric '{ev.metric}' is not one of "
                                         f"{[k for k, v in result.items() if isinstance(v, float)]}")
                metrics_log.write(iter=done, split=cfg.data.val_split,
                                  **{k: v for k, v in result.items() if k not in ("per_class", "confusion_matrix")})
                tb.evaluation(done, result, model, val_set, env.device)
                log.info("iter %d eval: %s", done, "  ".join(
                    f"{k} {result[k]:.2f}" for k in ("aAcc", "mIoU", "mAcc", "mDice") if result[k] is not None))
                if best is None or value > best["value"]:
                    best = {"metric": ev.metric, "value": value, "iter": done}
                    save(BEST, done)
                if done == iters and env.is_main:
                    atomic_write_json(run_dir / "eval.json", {"checkpoint": "last", "iter": done, **result})
                    _print_table(result)
            if done % cfg.checkpoint.interval == 0 or done == iters:
                save(LAST, done)
                if cfg.checkpoint.keep > 0 and env.is_main:
                    save_keep(run_dir, done, cfg.checkpoint.keep)
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), sorted(skipped)[:5])
        metrics_log.write(event="skipped_images", count=len(skipped), files=sorted(skipped))
    if env.is_main and start_iter < iters and has_learned_text(model):
        deploy_best(model, run_dir, cfg, travel)
        log.info("deployed model (text embeddings computed once, no text encoder): %s",
                 run_dir / CKPT_DIR / DEPLOYED)
    log.info("%s", _summary(run_dir, best, iters))
    log.info("run ended: finished at iteration %d", iters, extra=FILE_ONLY)
    metrics_log.write(event="end", status="finished", iter=iters)
    return run_dir


def _summary(run_dir: Path, best: dict | None, iters: int) -> str:
    """The run's last log line: where it is and its best evaluation."""
    score = (f"best {best['metric']} {best['value']:.2f} at iteration {best['iter']} ({run_dir / CKPT_DIR / BEST})"
             if best else "no evaluation")
    return f"done: {iters} iteration{'s' if iters != 1 else ''} in '{run_dir}'; {score}"


def deploy_best(model: torch.nn.Module, run_dir: Path, cfg: Recipe, travel: dict | None = None) -> None:
    """The deployed form of the best checkpoint (CLIP-distilled STDC-Seg, Sec. 3.3): the learned
    prompts' embeddings computed once and stored, the text encoder and context vectors dropped;
    the whole model in one file (``segprompt eval RUN --checkpoint deployed`` reads it)."""
    best_path = run_dir / CKPT_DIR / BEST
    if best_path.is_file():
        ckpt.load_model_state(model, ckpt.load_checkpoint(best_path)["model"], str(best_path))
    deploy_text(model)
    ckpt.save_checkpoint(run_dir / CKPT_DIR / DEPLOYED, model=ckpt.model_state(model, True), full_model=True,
                         deployed=True, config=cfg.to_dict(), **(travel or {}),
                         source=str(best_path if best_path.is_file() else run_dir / CKPT_DIR / LAST))


def save_keep(run_dir: Path, iteration: int, keep: int) -> None:
    """Keep the newest ``keep`` iteration checkpoints beside last/best (hard-linked to last.pt)."""
    d = run_dir / CKPT_DIR
    target = d / f"iter_{iteration:07d}.pt"
    if not target.exists():
        os.link(d / LAST, target)
    for old in sorted(d.glob("iter_*.pt"))[:-keep]:
        old.unlink()


def _print_table(result: dict) -> None:
    console = Console()
    console.print(format_table(result))
    console.print(summary_line(result), soft_wrap=True, markup=False, highlight=False)
