"""The papers' parameter and FLOPs figures beside ours: every parameter column of the tables in
:mod:`segprompt.experiments.tables`, counted on ``meta``-device models (``segprompt count-params``
without a recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from segprompt.config import Recipe, load_recipe, shipped_name
from segprompt.measure.bench import COST_KEYS, bench_model, default_size, model_costs
from segprompt.measure.params import Breakdown, breakdown, trainable_in


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


def paper_counts(tables: list, costs: bool = False) -> list[PaperCount]:
    """Every parameter column of ``tables`` (see :mod:`segprompt.experiments.tables`), counted under the
    paper's convention; a figure matches when equal at two decimals. With ``costs``, also every
    ``bench`` column that needs no timing (``params``, ``params_inference``, ``flops_mmcv``,
    ``flops_torch``: the STDC paper's #Params and FLOPs), computed on the recipe's deployed model at
    its default bench size (:mod:`segprompt.measure.bench`), scaled by the column's ``scale`` and
    compared at its ``digits``."""
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
