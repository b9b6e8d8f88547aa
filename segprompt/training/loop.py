"""The training loop: iteration-based, one code path for CPU, one GPU and DDP under torchrun.

:func:`run_loop` reads top to bottom: :func:`setup` builds the model (tuning method applied, so
frozen parameters are frozen before DDP wraps it), the optimizer, the poly schedule and the
resumable sampler, and restores a checkpoint when resuming; then each iteration stops cleanly if a
signal came (:func:`stop_if_asked`), takes one optimiser step (:func:`train_step`: gradients
accumulated over micro-batches, the loss checked finite on every rank, clipped, stepped), logs,
evaluates every ``evaluation.interval`` iterations keeping the best checkpoint (:func:`validate`) and
writes ``checkpoints/last.pt`` every ``checkpoint.interval`` iterations (:class:`Checkpoints`).

Resuming restores the model, optimizer, scheduler, grad scaler, iteration, data order (the
sampler restarts at the saved step) and every RNG state of every rank, so on CPU in
deterministic mode a resumed run ends bitwise identical to an uninterrupted one. How a run starts
and ends (lock, plan, end states) is :mod:`segprompt.training.launch`.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from segprompt import distributed as dist_utils
from segprompt.build import (
    build_eval_dataset,
    build_model,
    build_segmentor,
    build_train_dataset,
    dataset_meta,
)
from segprompt.config import Recipe, dump_recipe
from segprompt.data.dataset import collate, start_workers, worker_init
from segprompt.data.meta import DatasetMeta
from segprompt.data.sampler import TrainBatchSampler
from segprompt.data.transforms import normalize
from segprompt.errors import NonFiniteLoss, RunInterrupted, SegpromptError, os_problem
from segprompt.evaluation.evaluate import evaluate
from segprompt.evaluation.inference import autocast
from segprompt.evaluation.metrics import format_table, summary_line
from segprompt.io import atomic_write_json
from segprompt.models.frozen import kept_in_eval
from segprompt.models.text.guidance import deploy_text, has_learned_text
from segprompt.progress import make_console, progress_bar
from segprompt.runs import checkpoint as ckpt
from segprompt.runs.rundir import (
    BEST,
    CKPT_DIR,
    DEPLOYED,
    FILE_ONLY,
    LAST,
    MetricsLog,
    environment,
    write_run_files,
)
from segprompt.runs.runplan import RunPlan
from segprompt.training.interrupt import StopSignal
from segprompt.training.optim import build_optimizer, build_scheduler
from segprompt.training.trackers import Trackers
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


@dataclass
class Progress:
    iteration: int | None = None  # None until the loop starts


@dataclass
class Run:
    """What the loop works on (:func:`setup`)."""

    cfg: Recipe
    meta: DatasetMeta
    model: nn.Module  # what is saved and evaluated
    net: nn.Module  # what trains: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    batches: Iterator[dict[str, Any]]
    val_set: Any
    trainable: list[nn.Parameter]
    start_iter: int
    best: dict | None  # {"metric", "value", "iter"} of the best evaluation so far
    resumed: dict[str, Any] | None  # the checkpoint resumed from


def setup(plan: RunPlan, env: dist_utils.DistEnv, load_from: str | Path | None, load_from_partial: bool, log,
          metrics_log: MetricsLog) -> Run:
    """Model, optimizer, schedule, scaler and data of a run, restored from ``plan.resume_from``."""
    cfg, run_dir = plan.cfg, plan.run_dir
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
        model = dist_utils.convert_sync_batchnorm(model, env.device, kept_in_eval)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.runtime.amp == "fp16")
    if cfg.runtime.amp == "bf16" and env.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SegpromptError("runtime.amp is 'bf16' but this GPU does not support bfloat16; use fp16")

    start_iter, best, rng_states, state = 0, None, None, None
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
    # "% of full" as count-params and the demo compute it (docs/measurement.md): against full tuning's
    # network, built again on the meta device (no memory) with nothing inserted or frozen
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        share = full_share(model, build_segmentor(cfg, meta, load_pretrained=False).parameters())
    log.info("run %s | %d process(es) on %s | global batch %d = %d x %d micro x %d accum | "
             "trainable %s parameters = %.2f%% of full tuning's %s", run_dir, env.world_size, env.device,
             cfg.data.batch_size, env.world_size, micro, cfg.optimizer.accum_steps, f"{share.trainable:,}",
             share.percent, f"{share.full:,}")
    return Run(cfg, meta, model, net, optimizer, scheduler, scaler, batches, val_set,
               [p for p in model.parameters() if p.requires_grad], start_iter, best, state)


class Checkpoints:
    """Writes ``last.pt`` / ``best.pt`` of a run: what training changed (or the whole model), where the
    frozen weights come from, the optimizer, schedule, scaler and every rank's RNG state, and what
    lets the run travel (classes, palette, working folder). A failed write names what is intact."""

    def __init__(self, plan: RunPlan, env: dist_utils.DistEnv, run: Run, load_from: str | Path | None,
                 command: Callable[[bool], str]):
        self.run_dir, self.env, self.run, self.command = plan.run_dir, env, run, command
        cfg = run.cfg
        # a model with nothing frozen (full tuning, learn-from-scratch) needs no frozen-weights file
        frozen = any(not p.requires_grad for p in run.model.parameters())
        # frozen weights initialised from another run's checkpoint come from that file (kept on resume)
        init_from = load_from if frozen and load_from else None
        if frozen and run.resumed is not None and run.resumed.get("frozen_source", {}).get("init"):
            init_from = run.resumed["frozen_source"]["init"]["path"]
        self.fixed = {"full_model": cfg.checkpoint.save_full_model, "config": cfg.to_dict(),
                      "frozen_source": ckpt.frozen_source(cfg.model.pretrained if frozen else None, cfg.runtime.seed,
                                                          init_from)}
        self.saved = {LAST: run.start_iter} if plan.resume_from is not None else {}  # name -> iteration on disk
        if run.best is not None:
            self.saved[BEST] = run.best["iter"]

    def save(self, name: str, iteration: int, travel: dict[str, Any]) -> None:
        run = self.run
        states = dist_utils.all_gather_object(ckpt.rng_state())
        if self.env.is_main:
            path = self.run_dir / CKPT_DIR / name
            model_state = ckpt.model_state(run.model, run.cfg.checkpoint.save_full_model)
            bad = non_finite(model_state)
            if bad:  # never kept as best or last (the step check stops a run first; this is the last guard)
                raise NonFiniteLoss(f"'{name}' of iteration {iteration} not saved: {len(bad)} tensor(s) hold inf or "
                                    f"NaN (e.g. {bad[0]}); the run diverged. Lower optimizer.lr or set "
                                    f"optimizer.grad_clip")
            try:
                ckpt.save_checkpoint(
                    path, model=model_state,
                    optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                    scaler=run.scaler.state_dict(), iteration=iteration, best=run.best, rng=states, **self.fixed,
                    **travel)
            except OSError as e:  # the write is atomic: the file on disk is the previous one
                kept = (f"the previous '{name}' (iteration {self.saved[name]}) is intact"
                        if name in self.saved and path.is_file() else f"no earlier '{name}' was written")
                raise SegpromptError(f"checkpoint of iteration {iteration} not saved: "
                                     f"{os_problem(e, path, hint=False)}; {kept}. Free space (or fix what the error "
                                     f"names), then continue with `{self.command(True)}`") from None
            self.saved[name] = iteration
        dist_utils.barrier()


def stop_if_asked(stop: StopSignal, env: dist_utils.DistEnv, step: int, run: Run, plan: RunPlan, save,
                  load_from: str | Path | None, command: Callable[[bool], str]) -> None:
    """At an iteration boundary, on every rank: after SIGINT/SIGTERM, save ``last.pt`` (unless this
    iteration's is on disk) and raise :class:`RunInterrupted` with the command that continues."""
    signum = stop.received(env.device)  # every rank, every iteration (interrupt.py)
    if not signum:
        return
    if step > run.start_iter and step % run.cfg.checkpoint.interval:
        save(LAST, step)  # not saved at this iteration yet
    saved = step > run.start_iter or plan.resume_from is not None
    where = f"interrupted at iteration {step}"
    where += "" if saved else ", before training started (nothing to save)"
    if saved or not load_from:  # --resume auto also restarts a run that has no checkpoint
        raise RunInterrupted(f"{where}; resume with `{command(True)}`", signum)
    raise RunInterrupted(f"{where}; start it again with `{command(False)}`", signum)  # with --load-from


def train_step(run: Run, env: dist_utils.DistEnv, skipped: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step: gradients accumulated over ``optimizer.accum_steps`` micro-batches. Returns
    the loss and its parts averaged over ranks (before the step is taken: :func:`take_step`)."""
    cfg, net = run.cfg, run.net
    run.optimizer.zero_grad(set_to_none=True)
    parts: dict[str, torch.Tensor] = {}
    for k in range(cfg.optimizer.accum_steps):
        batch = next(run.batches)
        skipped.update(batch["skipped"])
        img = normalize(batch["img"].to(env.device, non_blocking=True), cfg.data.mean, cfg.data.std)
        label = batch["label"].to(env.device, non_blocking=True)
        # the part of the original image each crop covers, so SPM's M0 follows the crop (docs/spm.md)
        view = batch["view"].to(env.device, non_blocking=True) if "view" in batch else None
        last_micro = k == cfg.optimizer.accum_steps - 1
        sync = net.no_sync() if (env.distributed and not last_micro) else contextlib.nullcontext()
        with sync:
            with autocast(env.device, cfg.runtime.amp):
                losses = net(img, label, view=view)
            loss = sum(losses.values()) / cfg.optimizer.accum_steps
            run.scaler.scale(loss).backward()
        for name, v in losses.items():
            parts[name] = parts.get(name, 0.0) + v.detach().float() / cfg.optimizer.accum_steps
    values = dist_utils.all_reduce_mean(torch.stack([sum(parts.values()), *parts.values()]))
    return values, parts


def check_finite(values: torch.Tensor, parts: dict[str, torch.Tensor], step: int, run_dir: Path,
                 metrics_log: MetricsLog) -> None:
    """A non-finite loss on any rank stops every rank before the step, naming the last good checkpoint."""
    if torch.isfinite(values).all():
        return
    named = dict(zip(["loss", *parts], values.tolist()))
    last = run_dir / CKPT_DIR / LAST
    metrics_log.write(event="non_finite_loss", iter=step + 1, **{n: float(v) for n, v in named.items()})
    raise NonFiniteLoss(
        f"non-finite loss at iteration {step + 1} ({', '.join(f'{n}={v:.4g}' for n, v in named.items())}); "
        f"training stopped without saving. "
        + (f"The last good checkpoint is '{last}' (iteration {ckpt.load_checkpoint(last)['iteration']})"
           if last.is_file() else "No checkpoint was saved before it")
        + ". Lower optimizer.lr, set optimizer.grad_clip, or check the data")


def check_weights(run: Run, values: torch.Tensor, step: int, run_dir: Path, metrics_log: MetricsLog) -> None:
    """After the step: the trainable weights and the floating-point buffers (BatchNorm's running
    statistics) are finite, or every rank stops (each holds the same weights) before anything is
    saved. A divergence can leave the loss finite (2e18) while weights or running variances overflow;
    one fused norm per tensor is the whole cost."""
    stats = [b for m in run.model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
             for b in (m.running_mean, m.running_var) if b is not None]  # not every buffer: CLIP's mask is -inf
    tensors = [p.detach() for p in run.trainable] + stats
    norms = torch._foreach_norm(tensors)
    if not norms or torch.isfinite(torch.stack([n.float() for n in norms])).all():
        return
    bad = sum(1 for n in norms if not torch.isfinite(n))
    last = run_dir / CKPT_DIR / LAST
    metrics_log.write(event="non_finite_weights", iter=step + 1, tensors=bad, loss=float(values[0]))
    raise NonFiniteLoss(
        f"the optimisation diverged at iteration {step + 1}: {bad} weight or statistics tensor(s) hold inf or "
        f"NaN after the step (the loss was {float(values[0]):.4g}); training stopped without saving. "
        + (f"The last good checkpoint is '{last}' (iteration {ckpt.load_checkpoint(last)['iteration']})"
           if last.is_file() else "No checkpoint was saved before it")
        + ". Lower optimizer.lr, set optimizer.grad_clip, or check the data")


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """The floating-point tensors of a state dict that hold inf or NaN."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def take_step(run: Run) -> None:
    """Clip (``optimizer.grad_clip``), step the optimizer through the grad scaler, step the schedule."""
    if run.cfg.optimizer.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.trainable, run.cfg.optimizer.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()


def validate(run: Run, env: dist_utils.DistEnv, done: int, save, tb: Trackers, metrics_log: MetricsLog,
             log, run_dir: Path) -> None:
    """Evaluate on the validation split, log it, and keep ``best.pt`` when ``evaluation.metric``
    improved; at the last iteration also write ``eval.json`` and print the per-class table."""
    cfg, ev = run.cfg, run.cfg.evaluation
    result = evaluate(run.model, run.val_set, cfg, env, show_progress=False)
    value = result.get(ev.metric)
    if value is None:
        raise SegpromptError(f"evaluation.metric '{ev.metric}' is not one of "
                             f"{[k for k, v in result.items() if isinstance(v, float)]}")
    metrics_log.write(iter=done, split=cfg.data.val_split,
                      **{k: v for k, v in result.items() if k not in ("per_class", "confusion_matrix")})
    tb.evaluation(done, result, run.model, run.val_set, env.device)
    log.info("iter %d eval: %s", done, "  ".join(
        f"{k} {result[k]:.2f}" for k in ("aAcc", "mIoU", "mAcc", "mDice") if result[k] is not None))
    if run.best is None or value > run.best["value"]:
        run.best = {"metric": ev.metric, "value": value, "iter": done}
        save(BEST, done)
    if done == cfg.schedule.iters and env.is_main:
        atomic_write_json(run_dir / "eval.json", {"checkpoint": "last", "iter": done, **result})
        _print_table(result)


def log_step(run: Run, done: int, values: torch.Tensor, parts: dict[str, torch.Tensor], seconds: float, info: str,
             tb: Trackers, metrics_log: MetricsLog, log) -> None:
    """One ``metrics.jsonl`` record (loss, its parts, lr, time, the inserted modules' diagnostics),
    the loggers' scalars and a log line."""
    record = {"iter": done, "lr": run.optimizer.param_groups[0]["lr"], "loss": float(values[0]),
              **{n: float(v) for n, v in zip(parts, values[1:].tolist())}, "time": seconds}
    for module in run.model.inserted:  # e.g. the SPMs' prompt sizes and gradient norms
        record.update(module.diagnostics())
    metrics_log.write(**record)
    tb.scalars(done, record)
    log.info("iter %d/%d %s", done, run.cfg.schedule.iters, info)


def run_loop(plan: RunPlan, env: dist_utils.DistEnv, load_from: str | Path | None, load_from_partial: bool, log,
             metrics_log: MetricsLog, stop: StopSignal, command: Callable[[bool], str], at: Progress) -> Path:
    """Train ``plan``'s run from its first (or resumed) iteration to ``schedule.iters``."""
    cfg, run_dir = plan.cfg, plan.run_dir
    seed_everything(cfg.runtime.seed + env.rank, cfg.runtime.deterministic, cfg.runtime.cudnn_benchmark)
    if env.is_main:
        write_run_files(run_dir, dump_recipe(cfg), environment(env.world_size, cfg.runtime.seed, env.device))
    run = setup(plan, env, load_from, load_from_partial, log, metrics_log)
    tb = Trackers(run_dir, cfg, write=env.is_main, first_iter=run.start_iter)  # runtime.loggers
    travel = ckpt.travel_record(run.meta)
    checkpoints = Checkpoints(plan, env, run, load_from, command)

    def save(name: str, iteration: int) -> None:
        checkpoints.save(name, iteration, travel)

    iters, skipped = cfg.schedule.iters, set()
    run.net.train()
    t_log = time.perf_counter()
    with progress_bar(env.is_main) as bar, tb, warnings.catch_warnings():
        # fp16: a step the scaler skipped (overflowing gradients) makes torch warn that the schedule
        # stepped without the optimizer; the schedule follows iterations, as intended (docs/gpu.md). Set
        # once for the loop: a catch_warnings per iteration would reset every warning's "shown once" state
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        task = bar.add_task("train", total=iters, completed=run.start_iter, info="")
        for step in range(run.start_iter, iters):
            at.iteration = step
            stop_if_asked(stop, env, step, run, plan, save, load_from, command)
            values, parts = train_step(run, env, skipped)
            check_finite(values, parts, step, run_dir, metrics_log)
            take_step(run)
            check_weights(run, values, step, run_dir, metrics_log)
            done = at.iteration = step + 1
            info = f"loss {values[0]:.4f} lr {run.optimizer.param_groups[0]['lr']:.2e}"
            bar.update(task, completed=done, info=info)
            if done % cfg.runtime.log_interval == 0 or done == iters:
                now = time.perf_counter()
                log_step(run, done, values, parts, now - t_log, info, tb, metrics_log, log)
                t_log = now
            if (cfg.evaluation.interval and done % cfg.evaluation.interval == 0) or done == iters:
                validate(run, env, done, save, tb, metrics_log, log, run_dir)
            if done % cfg.checkpoint.interval == 0 or done == iters:
                save(LAST, done)
                if cfg.checkpoint.keep > 0 and env.is_main:
                    save_keep(run_dir, done, cfg.checkpoint.keep)
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), sorted(skipped)[:5])
        metrics_log.write(event="skipped_images", count=len(skipped), files=sorted(skipped))
    if env.is_main and run.start_iter < iters and has_learned_text(run.model):
        deploy_best(run.model, run_dir, cfg, travel)
        log.info("deployed model (text embeddings computed once, no text encoder): %s",
                 run_dir / CKPT_DIR / DEPLOYED)
    log.info("%s", _summary(run_dir, run.best, iters))
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
    console = make_console()
    console.print(format_table(result))
    console.print(summary_line(result), soft_wrap=True, markup=False, highlight=False)
