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
    from segprompt.engine.build import apply_tuning, build_segmentor
    from segprompt.tuning import TuningContext

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


@dataclass
class PaperCount:
    """One parameter (or FLOPs) figure of a paper's table beside ours, in the column's unit (M
    parameters, G FLOPs) at the paper's rounding."""

    paper: str
    table: str
    row: str
    column: str
    ours: float
    paper_value: float
    match: bool
    reason: str | None
    recipe: str


def trainable_in(b: Breakdown, group: str) -> int:
    """Trainable parameters of one group, or of all groups (``trainable``)."""
    return b.trainable if group == "trainable" else b.groups[group]["trainable"]


def paper_counts(tables: list, costs: bool = False) -> list[PaperCount]:
    """Every parameter column of ``tables`` (see :mod:`segprompt.tables`), counted under the
    paper's convention; a figure matches when equal at two decimals. With ``costs``, also every
    ``bench`` column that needs no timing (``params``, ``params_inference``, ``flops_mmcv``,
    ``flops_torch``: the STDC paper's #Params and FLOPs), computed on the recipe's deployed model at
    its default bench size (:mod:`segprompt.engine.bench`), scaled by the column's ``scale`` and
    compared at its ``digits``."""
    from segprompt.config import load_recipe, shipped_name
    from segprompt.engine.bench import COST_KEYS, bench_model, default_size, model_costs

    cache: dict[tuple, Breakdown] = {}
    models: dict[tuple, tuple[Recipe, nn.Module]] = {}
    out = []
    for t in tables:
        for i, col in enumerate(t.columns):
            if col.params is None and not (costs and col.bench in COST_KEYS):
                continue
            for row in t.rows:
                if col.name in row.skip or row.paper[i] is None:
                    continue
                recipe, overrides = t.cells(row, col)[0]
                key = (str(recipe), tuple(overrides))
                if col.params is not None:
                    counts = []
                    for recipe_i, overrides_i in t.cells(row, col):
                        key_i = (str(recipe_i), tuple(overrides_i))
                        if key_i not in cache:
                            cfg = load_recipe(recipe_i, overrides_i)
                            cache[key_i] = breakdown(cfg, cfg.data.num_classes, "paper")
                        counts.append(trainable_in(cache[key_i], col.params))
                    ours = round(sum(counts) / len(counts) / 1e6, 2)
                else:
                    if key not in models:
                        cfg = load_recipe(recipe, overrides)
                        models[key] = (cfg, bench_model(cfg))
                    cfg, model = models[key]
                    value = model_costs(model, default_size(cfg), (col.bench,))[col.bench]
                    ours = round(value * col.scale, col.digits)
                paper_value = float(row.paper[i])
                match = abs(ours - paper_value) < 1e-9
                reason = None if match else (t.note(row, col) or "differs from the paper (no known reason)")
                out.append(PaperCount(t.paper, t.table, row.name, col.name, ours, paper_value, match, reason,
                                      shipped_name(recipe) or str(recipe)))
    return out
