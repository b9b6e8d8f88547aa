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
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from segprompt.config import Recipe
from segprompt.data.meta import DatasetMeta
from segprompt.engine.build import apply_tuning, build_segmentor
from segprompt.tuning import TuningContext

CONVENTIONS = ("paper", "all")


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
    full_tuning: int  # trainable parameters if everything trained (same convention)

    @property
    def trainable(self) -> int:
        return sum(g["trainable"] for g in self.groups.values())

    @property
    def frozen(self) -> int:
        return sum(g["total"] - g["trainable"] for g in self.groups.values())


def build_counted(cfg: Recipe, num_classes: int) -> tuple[nn.Module, set[int]]:
    """The recipe's model on the meta device, and the ids of the parameters it had before tuning."""
    meta = DatasetMeta(name="count", classes=[f"c{i}" for i in range(num_classes)],
                       palette=[[0, 0, 0]] * num_classes)
    with torch.device("meta"):
        model = build_segmentor(cfg, meta, load_pretrained=False)
        original = {id(p) for p in model.parameters()}
        apply_tuning(model, cfg, TuningContext(num_classes=num_classes))
    return model, original


def breakdown(cfg: Recipe, num_classes: int, convention: str = "paper") -> Breakdown:
    model, original = build_counted(cfg, num_classes)
    head_ids = {id(p) for head in (model.decode_head, *model.aux_heads) for p in head.parameters()}
    backbone = [p for p in model.backbone.parameters() if id(p) in original]
    inserted = [p for p in model.parameters() if id(p) not in original]
    heads = [p for p in model.parameters() if id(p) in head_ids and id(p) in original]
    groups = {}
    for name, params in (("backbone", backbone), ("prompt", inserted), ("head", heads)):
        groups[name] = {"total": count(model, params, convention),
                        "trainable": count(model, [p for p in params if p.requires_grad], convention)}
    stored = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # full tuning trains the original network (backbone and heads), with nothing inserted
    full = copy.deepcopy(model).requires_grad_(True)
    originals = [p for p, q in zip(full.parameters(), model.parameters()) if id(q) in original]
    return Breakdown(convention, groups, stored, count(full, originals, convention))


def trainable_in(b: Breakdown, group: str) -> int:
    """Trainable parameters of one group, or of all groups (``trainable``)."""
    return b.trainable if group == "trainable" else b.groups[group]["trainable"]
