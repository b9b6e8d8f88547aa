"""Distributed evaluation: each rank predicts its shard, confusion matrices are summed.

Every image is evaluated exactly once across ranks (no padded duplicates, no drops), the
prediction is compared at the label's resolution, and only a KxK matrix per rank is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from segprompt import distributed as dist_utils
from segprompt.build import build_eval_dataset
from segprompt.config import Recipe, load_recipe
from segprompt.data.dataset import (
    SegDataset,
    collate,
    read_image,
    start_workers,
    worker_init,
)
from segprompt.data.sampler import eval_shard
from segprompt.data.transforms import normalize
from segprompt.distributed import DistEnv, all_gather_object
from segprompt.errors import SegpromptError
from segprompt.evaluation.inference import (
    autocast,
    check_mode,
    save_prediction,
    segment_logits,
)
from segprompt.evaluation.metrics import ConfusionMatrix, compute_metrics
from segprompt.io import write_json_keeping_history
from segprompt.models.inserted import Inserted
from segprompt.models.segmentor import EncoderDecoder
from segprompt.progress import progress_bar
from segprompt.runs.load import (
    CHECKPOINT_NAMES,
    build_source_model,
    names_recipe,
    read_source,
)
from segprompt.runs.rundir import default_run_dir
from segprompt.runs.runlock import holder, refuse_live_run


@torch.no_grad()
def evaluate(model: nn.Module, dataset: SegDataset, cfg: Recipe, env: DistEnv, *, mode: str | None = None,
             tta: bool | None = None, save_preds: Path | None = None, show_progress: bool = True) -> dict[str, Any]:
    ev = cfg.evaluation
    mode = mode or ev.mode
    tta = ev.tta if tta is None else tta
    recognition = getattr(dataset, "task", "segmentation") == "recognition"
    if recognition and (tta or save_preds is not None or mode == "slide"):
        raise SegpromptError("recognition datasets are evaluated on the whole image only: "
                             "no --tta, --mode slide or --save-preds")
    was_training = model.training
    model.eval()
    # segmentation images differ in size, so one per forward; recognition images share one size
    batch_size = max(cfg.data.batch_size // (env.world_size * cfg.optimizer.accum_steps), 1) if recognition else 1
    loader = DataLoader(dataset, batch_size=batch_size, sampler=eval_shard(len(dataset), env.world_size, env.rank),
                        num_workers=cfg.runtime.num_workers, collate_fn=collate, worker_init_fn=worker_init,
                        pin_memory=env.device.type == "cuda", generator=torch.Generator())
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, device=env.device)
    # SPM diagnostics (docs/spm.md): the mIoU of every slot's final interim semantic map
    chains = list(model.inserted) if isinstance(model, EncoderDecoder) and not recognition else []
    interim: dict[int, ConfusionMatrix] = {}
    for chain in chains:
        chain.capture(True)
    skipped: list[str] = []
    palette = dataset.meta.palette
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []), \
            progress_bar(show_progress and env.is_main) as bar:
        task = bar.add_task("eval", total=len(loader), info="")
        for batch in start_workers(loader):
            skipped += batch["skipped"]
            bar.update(task, advance=1)
            if batch["img"] is None:
                continue
            img = normalize(batch["img"].to(env.device, non_blocking=True), cfg.data.mean, cfg.data.std)
            label = batch["label"].to(env.device, non_blocking=True)
            if recognition:
                with autocast(env.device, cfg.runtime.amp):
                    logits = model(img)
            else:
                logits = segment_logits(model, img, tuple(label.shape[-2:]), cfg, env.device, mode=mode, tta=tta)
            pred = logits.argmax(1)
            cm.update(pred, label)
            if chains:
                _update_interim(model, chains, interim, img, label, cfg, env, mode == "whole" and not tta,
                                dataset.ignore_index)
            if save_preds is not None:
                for i, stem in enumerate(batch["stem"]):
                    save_prediction(save_preds, stem, pred[i].cpu().numpy(), read_image(Path(batch["path"][i])),
                                    palette, num_classes=dataset.num_classes)
    cm.all_reduce()
    for chain in chains:
        chain.capture(False)
    model.train(was_training)
    metrics = compute_metrics(cm.mat.cpu(), dataset.meta.classes, categories=dataset.meta.extra.get("categories"))
    for slot, slot_cm in sorted(interim.items()):
        slot_cm.all_reduce()
        metrics[f"spm{slot}_interim_mIoU"] = compute_metrics(slot_cm.mat.cpu(), dataset.meta.classes)["mIoU"]
    metrics["confusion_matrix"] = cm.mat.cpu().tolist()  # rows: ground truth; columns: prediction
    if recognition:
        metrics["top1"] = metrics["aAcc"]  # overall accuracy over images = top-1 accuracy
    all_skipped = sorted(s for part in all_gather_object(skipped) for s in part)
    metrics["images"] = len(dataset) - len(all_skipped)
    metrics["skipped_images"] = all_skipped
    metrics["mode"] = mode
    metrics["tta"] = bool(tta)
    return metrics


def _update_interim(model: nn.Module, chains: list[Inserted], interim: dict[int, ConfusionMatrix], img: torch.Tensor,
                    label: torch.Tensor, cfg: Recipe, env: DistEnv, one_pass: bool, ignore_index: int) -> None:
    """Score each slot's captured interim map against the label. The maps come from the inference
    pass when it was one whole-image pass; after slide or TTA inference, from one extra whole pass."""
    if not one_pass:
        for chain in chains:
            chain.captured.clear()
        with autocast(env.device, cfg.runtime.amp):
            model(img)
    for chain in chains:
        for slot, smap in chain.captured.items():
            up = F.interpolate(smap.float(), size=label.shape[-2:], mode="bilinear",
                               align_corners=cfg.model.align_corners)
            if slot not in interim:
                interim[slot] = ConfusionMatrix(up.shape[1], ignore_index, device=env.device)
            interim[slot].update(up.argmax(1), label)
        chain.captured.clear()


def eval_json(run_dir: Path, split: str, val_split: str) -> Path:
    """Where ``segprompt eval`` writes: ``eval.json`` for the validation split, ``eval_<split>.json``
    for any other, so evaluating the test split never moves the validation result aside."""
    return run_dir / ("eval.json" if split == val_split else f"eval_{split}.json")


def evaluate_checkpoint(target: str | Path, *, checkpoint: str | None = None, overrides: list[str] = (),
                        mode: str | None = None, tta: bool | None = None, split: str | None = None,
                        save_preds: str | Path | None = None, weights: str | Path | None = None
                        ) -> tuple[Path, dict[str, Any]]:
    """``segprompt eval``: a run directory (its config and ``best``/``last``/``deployed`` checkpoint), a
    checkpoint file, a delta, or a recipe with ``--checkpoint PATH``. Writes ``eval.json`` (another
    split: ``eval_<split>.json``, :func:`eval_json`) into the run directory (elsewhere:
    ``results/eval-<name>/<timestamp>/``); an earlier one is moved to ``eval_history/`` first,
    never overwritten. Returns that file's path and the metrics."""
    target = Path(target)
    is_recipe = names_recipe(target)
    if is_recipe:
        recipe = load_recipe(target, list(overrides))
        if checkpoint in (None, *CHECKPOINT_NAMES):
            raise SegpromptError(f"evaluating recipe '{target}' needs --checkpoint PATH (best/last name checkpoints "
                                 f"of a run directory)")
        src = read_source(checkpoint, overrides=overrides, weights=weights, need_data=True, recipe=recipe)
    else:
        src = read_source(target, checkpoint, overrides=overrides, weights=weights, need_data=True)
    cfg = src.cfg
    run_dir = None if is_recipe else src.run_dir
    if run_dir is not None and holder(run_dir) is not None:  # a running run is read-only: evaluate beside it
        run_dir = default_run_dir(f"eval-{run_dir.name}")
    elif run_dir is None:
        name = target.stem if is_recipe else src.path.stem
        run_dir = default_run_dir(name).with_name("eval-" + default_run_dir(name).name)
    if mode is not None:
        check_mode(cfg, mode)
    if save_preds is not None:
        save_preds = Path(save_preds)
        refuse_live_run(save_preds, "--save-preds")
        if save_preds.exists() and any(save_preds.iterdir()):
            raise SegpromptError(f"--save-preds folder '{save_preds}' is not empty; choose a new folder")
    env = dist_utils.init_distributed(cfg.runtime.device)
    try:
        model = build_source_model(src).to(env.device)
        dataset = build_eval_dataset(cfg, src.meta, split)
        result = evaluate(model, dataset, cfg, env, mode=mode, tta=tta, save_preds=save_preds)
        result = {"checkpoint": str(src.path), "iter": src.state.get("iteration"), "split": dataset.split, **result}
        path = eval_json(run_dir, dataset.split, cfg.data.val_split)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_keeping_history(path, result, "eval_history")
        return path, result
    finally:
        dist_utils.cleanup()
