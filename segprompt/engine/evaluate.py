"""Distributed evaluation: each rank predicts its shard, confusion matrices are summed.

Every image is evaluated exactly once across ranks (no padded duplicates, no drops), the
prediction is compared at the label's resolution, and only a KxK matrix per rank is kept.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from segprompt.config import Recipe
from segprompt.data.dataset import SegDataset, collate, read_image, start_workers, worker_init
from segprompt.data.meta import DatasetMeta
from segprompt.data.sampler import eval_shard
from segprompt.data.transforms import normalize
from segprompt.engine import checkpoint as ckpt
from segprompt.engine import distributed as dist_utils
from segprompt.engine.build import (
    apply_tuning,
    build_eval_dataset,
    build_model,
    build_segmentor,
    dataset_meta,
    tuning_context,
)
from segprompt.engine.distributed import DistEnv, all_gather_object
from segprompt.engine.inference import MODES, inference, save_prediction
from segprompt.engine.metrics import ConfusionMatrix, compute_metrics
from segprompt.engine.rundir import default_run_dir, load_run_or_recipe, run_checkpoint
from segprompt.errors import SegpromptError
from segprompt.io import write_json_keeping_history
from segprompt.models.text.guidance import deploy_text
from segprompt.progress import progress_bar

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


SLIDE_WINDOW = "--set evaluation.crop_size=[512,512] --set evaluation.stride=[341,341]"  # e.g.
SLIDE_FIX = f"add e.g. {SLIDE_WINDOW}"


def check_mode(cfg: Recipe, mode: str, *, where: str = "the recipe", fix: str = SLIDE_FIX) -> None:
    """``--mode`` names an inference mode, and slide mode has its window in the recipe (``where``
    names it in the error, ``fix`` says what to do)."""
    if mode not in MODES:
        raise SegpromptError(f"--mode '{mode}' is not one of: {', '.join(MODES)}")
    if mode == "slide" and (cfg.evaluation.crop_size is None or cfg.evaluation.stride is None):
        raise SegpromptError(f"--mode slide needs evaluation.crop_size and evaluation.stride in {where}; {fix}")


def segment_logits(model: nn.Module, img: torch.Tensor, out_size: tuple[int, int], cfg: Recipe,
                   device: torch.device, *, mode: str, tta: bool) -> torch.Tensor:
    """B x K x ``out_size`` scores of normalised images ``img``, with the recipe's evaluation settings
    (window, TTA scales and flip, align_corners, autocast): the one inference call of ``eval`` and
    ``predict`` (docs/predict.md)."""
    ev = cfg.evaluation
    with autocast(device, cfg.runtime.amp):
        return inference(model, img, out_size, mode=mode, crop_size=ev.crop_size, stride=ev.stride,
                         batch_size=ev.slide_batch, scales=ev.tta_scales if tta else [1.0],
                         flip=ev.tta_flip and tta, align_corners=cfg.model.align_corners)


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
    chains = [] if recognition else [p for p in getattr(model, "loss_providers", []) if hasattr(p, "captured_maps")]
    interim: dict[int, ConfusionMatrix] = {}
    for chain in chains:
        chain.capture_maps, chain.captured_maps = True, {}
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
        chain.capture_maps, chain.captured_maps = False, {}
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


def _update_interim(model: nn.Module, chains: list[nn.Module], interim: dict[int, ConfusionMatrix], img: torch.Tensor,
                    label: torch.Tensor, cfg: Recipe, env: DistEnv, one_pass: bool, ignore_index: int) -> None:
    """Score each slot's captured interim map against the label. The maps come from the inference
    pass when it was one whole-image pass; after slide or TTA inference, from one extra whole pass."""
    if not one_pass:
        for chain in chains:
            chain.captured_maps = {}
        with autocast(env.device, cfg.runtime.amp):
            model(img)
    for chain in chains:
        for slot, smap in chain.captured_maps.items():
            up = F.interpolate(smap.float(), size=label.shape[-2:], mode="bilinear",
                               align_corners=cfg.model.align_corners)
            if slot not in interim:
                interim[slot] = ConfusionMatrix(up.shape[1], ignore_index, device=env.device)
            interim[slot].update(up.argmax(1), label)
        chain.captured_maps = {}


def build_checkpoint_model(cfg: Recipe, meta: Any, state: dict[str, Any], where: str) -> nn.Module:
    """The recipe's model with a checkpoint's weights. A whole-model checkpoint (``save_full_model``,
    or a deployed text-guided model) needs no pretrained file: it holds every tensor."""
    if not state.get("full_model"):
        model = build_model(cfg, meta)
        ckpt.restore_frozen(model, state, where)
        ckpt.load_model_state(model, state["model"], where)
        return model
    model = build_segmentor(cfg, meta, load_pretrained=False)
    apply_tuning(model, cfg, tuning_context(cfg, meta))
    if state.get("deployed"):
        deploy_text(model)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise SegpromptError(f"checkpoint '{where}' does not fit this recipe's model: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}")
    return model


def load_checkpoint_model(cfg: Recipe, ckpt_path: Path, state: dict[str, Any] | None = None
                          ) -> tuple[nn.Module, DatasetMeta, dict[str, Any]]:
    """The recipe's model with the weights of ``ckpt_path`` (``state``: its contents, if already
    read), its dataset's meta and the checkpoint's contents, as ``eval`` and ``predict`` load it."""
    meta = dataset_meta(cfg)
    if state is None:
        state = ckpt.load_run_checkpoint(ckpt_path)
    ckpt.check_frozen_source(state, cfg.model.pretrained, str(ckpt_path))
    return build_checkpoint_model(cfg, meta, state, str(ckpt_path)), meta, state


def evaluate_checkpoint(target: str | Path, *, checkpoint: str = "best", overrides: list[str] = (),
                        mode: str | None = None, tta: bool | None = None, split: str | None = None,
                        save_preds: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """``segprompt eval``: a run directory (its config and ``best``/``last`` checkpoint) or a recipe
    with ``--checkpoint PATH``. Writes ``eval.json`` into the run directory; an earlier one is
    moved to ``eval_history/`` first, never overwritten."""
    target = Path(target)
    cfg, run_dir = load_run_or_recipe(target, overrides)
    if run_dir is not None:
        ckpt_path = run_checkpoint(target, checkpoint)
    else:
        if checkpoint in ("best", "last"):
            raise SegpromptError(f"evaluating recipe '{target}' needs --checkpoint PATH "
                                 f"(best/last only make sense for a run directory)")
        ckpt_path = Path(checkpoint)
        run_dir = default_run_dir(target).with_name("eval-" + default_run_dir(target).name)
    if mode is not None:
        check_mode(cfg, mode)
    if save_preds is not None:
        save_preds = Path(save_preds)
        if save_preds.exists() and any(save_preds.iterdir()):
            raise SegpromptError(f"--save-preds folder '{save_preds}' is not empty; choose a new folder")
    env = dist_utils.init_distributed(cfg.runtime.device)
    try:
        model, meta, state = load_checkpoint_model(cfg, ckpt_path)
        model.to(env.device)
        dataset = build_eval_dataset(cfg, meta, split)
        result = evaluate(model, dataset, cfg, env, mode=mode, tta=tta, save_preds=save_preds)
        result = {"checkpoint": str(ckpt_path), "iter": state.get("iteration"), "split": dataset.split, **result}
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_keeping_history(run_dir / "eval.json", result, "eval_history")
        return run_dir, result
    finally:
        dist_utils.cleanup()
