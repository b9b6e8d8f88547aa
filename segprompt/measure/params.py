"""Parameter counting: per-group breakdowns of any recipe, and the papers' figures beside ours.

Models are built on the ``meta`` device (no memory, no pretrained files, seconds even for ViT-L).
Groups follow the SPM paper's tables: **Backbone** (the backbone's own parameters), **Prompt**
(everything a tuning method inserted: SPMs, side paths, adapters, prompt tokens) and **Head**
(decode and auxiliary heads). Inserted modules are recognised by identity: the parameters that
exist after the tuning method ran but not before.

Two counting conventions (``docs/spm.md``, "Counting conventions"):

* ``paper`` (every table of the SPM paper): every parameter except those of BatchNorm layers, as
  MMCV's counter reports the paper's SyncBN models. That is conv/linear weights and biases for the
  ResNet tables, and for ViT also LayerNorm, cls token and position embedding (the SETR heads'
  13.14M exclude their BatchNorms too). The one exception is a BatchNorm bias trained while its
  weight stays frozen: that is what Bias-Tuning trains (its 0.05M are BN betas).
* ``all``: every parameter.

"% of full" is one number whatever the convention (docs/measurement.md, "% of full"):
:func:`percent_of_full`, trainable parameters / full tuning's, both counted as every parameter, full
tuning being the same network without inserted modules. It is defined in segprompt.tuning.spm
(the training log may not import this package) and re-exported here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from segprompt.build import apply_tuning, build_segmentor
from segprompt.config import Recipe
from segprompt.data.meta import DatasetMeta
from segprompt.tuning import TuningContext
from segprompt.tuning.base import (
    FullShare,
    full_share,
    oversize_warning,
    percent_of_full,
)

CONVENTIONS = ("paper", "all")
__all__ = ["CONVENTIONS", "Breakdown", "FullShare", "breakdown", "build_counted", "count", "full_share",
           "percent_of_full", "trainable_in"]


def _norm_params(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    out = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for n, p in m.named_parameters(recurse=False):
                out[id(p)] = (m, n)
    return out


def count(model: nn.Module, params: Iterable[nn.Parameter], convention: str) -> int:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    params = list(params)
    if convention == "all":
        return sum(p.numel() for p in params)
    norms = _norm_params(model)
    total = 0
    for p in params:
        if id(p) not in norms:
            total += p.numel()
            continue
        m, name = norms[id(p)]
        if name == "bias" and p.requires_grad and m.weight is not None and not m.weight.requires_grad:
            total += p.numel()
    return total


@dataclass
class Breakdown:
    """Parameters per group (counted under ``convention``), trainable and total."""

    convention: str
    groups: dict[str, dict[str, int]]  # group -> {"total", "trainable"}
    stored_per_task: int  # what a checkpoint of this task stores (trainable parameters, all counted)
    full_tuning: int  # what full tuning trains (the network as built, nothing inserted), same convention
    share: FullShare  # "% of full": every parameter counted, whatever ``convention`` is
    warnings: list[str] = field(default_factory=list)  # the build's warnings (an oversized SPM), or ours

    @property
    def percent_of_full(self) -> float:
        return self.share.percent

    @property
    def trainable(self) -> int:
        return sum(g["trainable"] for g in self.groups.values())

    @property
    def frozen(self) -> int:
        return sum(g["total"] - g["trainable"] for g in self.groups.values())


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def kept_build_warnings() -> Iterator[list[str]]:
    """The warnings tuning methods log while building (the oversized-SPM one), kept in a list for
    the caller to report instead of printed through logging (which the CLI does not set up)."""
    logger, kept = logging.getLogger("segprompt.tuning"), _Kept()
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(kept)
    try:
        yield kept.messages
    finally:
        logger.removeHandler(kept)
        logger.propagate = propagate


def _build(cfg: Recipe, num_classes: int) -> tuple[nn.Module, set[int], nn.Module, list[str]]:
    """On the meta device: the tuned model, the ids of its parameters from before tuning, a copy of
    the network as built (nothing inserted, nothing frozen by the method) and the build's warnings."""
    meta = DatasetMeta(name="count", classes=[f"c{i}" for i in range(num_classes)],
                       palette=[[0, 0, 0]] * num_classes)
    with torch.device("meta"), kept_build_warnings() as warnings:
        model = build_segmentor(cfg, meta, load_pretrained=False)
        original = {id(p) for p in model.parameters()}
        untuned = copy.deepcopy(model)
        apply_tuning(model, cfg, TuningContext(num_classes=num_classes))
    return model, original, untuned, warnings


def build_counted(cfg: Recipe, num_classes: int) -> tuple[nn.Module, set[int]]:
    """The recipe's model on the meta device, and the ids of the parameters it had before tuning."""
    model, original, _, _ = _build(cfg, num_classes)
    return model, original


def breakdown(cfg: Recipe, num_classes: int, convention: str = "paper") -> Breakdown:
    model, original, untuned, warnings = _build(cfg, num_classes)
    head_ids = {id(p) for head in (model.decode_head, *model.aux_heads) for p in head.parameters()}
    backbone = [p for p in model.backbone.parameters() if id(p) in original]
    inserted = [p for p in model.parameters() if id(p) not in original]
    heads = [p for p in model.parameters() if id(p) in head_ids and id(p) in original]
    groups = {}
    for name, params in (("backbone", backbone), ("prompt", inserted), ("head", heads)):
        groups[name] = {"total": count(model, params, convention),
                        "trainable": count(model, [p for p in params if p.requires_grad], convention)}
    stored = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # full tuning trains the network as built (backbone and heads, less what it freezes by
    # construction, e.g. a CLIP text encoder), with nothing inserted
    full = count(untuned, [p for p in untuned.parameters() if p.requires_grad], convention)
    share = full_share(model, untuned.parameters())
    if cfg.tuning["name"] != "spm":  # the SPM warns at build time (kept in ``warnings``); the others here
        other = oversize_warning(share.inserted, share.full, f"shrink what tuning '{cfg.tuning['name']}' inserts "
                                 "(e.g. a smaller tuning.channels where it has one)")
        warnings += [other] if other else []
    return Breakdown(convention, groups, stored, full, share, warnings)


def trainable_in(b: Breakdown, group: str) -> int:
    """Trainable parameters of one group, or of all groups (``trainable``)."""
    return b.trainable if group == "trainable" else b.groups[group]["trainable"]
