"""Collecting a plan: per cell, the mean and sample standard deviation (ddof = 1) over its finished
seeds beside the paper's value."""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segprompt.build import dataset_meta
from segprompt.config import Recipe
from segprompt.errors import SegpromptError
from segprompt.evaluation.metrics import category_iou
from segprompt.experiments.ablate.plan import Plan, recipe_key, refresh_state
from segprompt.experiments.tables import Table
from segprompt.measure.params import breakdown, trainable_in


@dataclass
class CellValue:
    row: str
    column: str
    kind: str | None
    values: list[float]  # one per finished seed
    expected: int  # seeds the cell needs
    paper: Any
    digits: int
    status: str  # ok | partial | missing | recipe missing | skipped | reference
    reason: str | None = None
    runs: list[str] = field(default_factory=list)
    note: str | None = None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof = 1); none from a single seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def paper_mean(self) -> float | None:
        return parse_paper(self.paper)[0]

    @property
    def diff(self) -> float | None:
        if self.mean is None or self.paper_mean is None:
            return None
        return self.mean - self.paper_mean


@dataclass
class Collected:
    table: Table
    scale: str
    rows: list[str]
    cells: dict[tuple[str, str], CellValue]
    seeds_note: str | None = None

    @property
    def missing(self) -> list[CellValue]:
        return [c for c in self.cells.values() if c.status in ("missing", "recipe missing", "partial")]


def parse_paper(value: Any) -> tuple[float | None, float | None]:
    """A paper value -> (mean, std): numbers, ``"76.07±0.57"`` strings, or null."""
    if value is None:
        return None, None
    if isinstance(value, (int, float)):
        return float(value), None
    text = str(value).replace(" ", "").replace("\\pm", "±").replace("+-", "±")
    mean, _, std = text.partition("±")
    try:
        return float(mean), float(std) if std else None
    except ValueError:
        raise SegpromptError(f"paper value {value!r} is not a number or 'mean±std'") from None


def metric_value(result: dict, metric: str, categories: dict[str, list[str]] | None = None) -> float:
    """``metric`` of an ``eval.json``; raises KeyError with the reason when it has none."""
    if isinstance(result.get(metric), (int, float)):
        return float(result[metric])
    stat, _, name = metric.partition(".")
    if not name:
        raise KeyError(f"eval.json has no '{metric}'")
    classes = [r["class"] for r in result.get("per_class", [])]
    if stat == "categoryIoU":
        members = (categories or {}).get(name)
        if members is None:
            raise KeyError(f"the table defines no category '{name}'")
        mat = result.get("confusion_matrix")
        if mat is None:
            raise KeyError("eval.json has no confusion_matrix to merge classes into categories")
        unknown = [c for c in members if c not in classes]
        if unknown:
            raise KeyError(f"eval.json has no classes {unknown}")
        value = category_iou(torch.tensor(mat), classes, {name: members})[name]
        return float("nan") if value is None else value
    if name not in classes:
        raise KeyError(f"eval.json has no class '{name}' (it has: {', '.join(classes)})")
    per = result["per_class"][classes.index(name)]
    if stat == "share":
        total = sum(r["pixels"] for r in result["per_class"])
        return 100.0 * per["pixels"] / total
    if per.get(stat) is None:
        raise KeyError(f"eval.json gives no {stat} for class '{name}'")
    return float(per[stat])


def _num_classes(cfg: Recipe) -> int:
    if cfg.data.num_classes is not None:
        return cfg.data.num_classes
    try:
        return dataset_meta(cfg).num_classes
    except SegpromptError as e:
        raise KeyError(f"no data.num_classes and no readable meta.json to count the head with ({e})") from None


def _best_record(run_dir: Path, cfg: Recipe) -> dict:
    """The evaluation in metrics.jsonl with the best ``evaluation.metric`` (the best checkpoint's)."""
    key, best = cfg.evaluation.metric, None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if "split" in rec and rec.get(key) is not None and (best is None or rec[key] > best[key]):
                best = rec
    if best is None:
        raise KeyError(f"{run_dir / 'metrics.jsonl'} holds no evaluation")
    return best


def collect(plan: Plan) -> Collected:
    """Our value of every cell beside the paper's (reads the run directories, trains nothing)."""
    table = plan.table
    for run in plan.runs:
        refresh_state(run, plan.root.parent)
    out: dict[tuple[str, str], CellValue] = {}
    params_cache: dict[str, Any] = {}
    for cell in plan.cells:
        row, col = cell.row, cell.col
        # smoke networks have thousands of parameters, not millions: show them
        digits = max(col.digits, 4) if col.kind == "params" and plan.scale == "smoke" else col.digits
        cv = CellValue(row.name, col.name, col.kind, [], len(cell.runs) or 1, row.paper[cell.index], digits,
                       "missing", note=table.note(row, col))
        out[(row.name, col.name)] = cv
        if cell.skipped:
            cv.status, cv.expected = "skipped", 0
            continue
        if col.kind is None:
            cv.status = "reference"
            continue
        if col.kind == "gain":
            continue  # from the other columns, below
        if any(r.cfg is None for r in cell.runs) or (col.kind == "params" and not cell.runs):
            cv.status, cv.reason = "recipe missing", f"{cell.recipe and recipe_key(cell.recipe)} does not exist"
            continue
        reasons = []
        for run in cell.runs:
            where = run.result_dir or run.dir
            try:
                if col.kind == "params":
                    if run.hash not in params_cache:
                        params_cache[run.hash] = breakdown(run.cfg, _num_classes(run.cfg), "paper")
                    cv.values.append(trainable_in(params_cache[run.hash], col.params) / 1e6)
                elif col.kind == "bench":
                    path = where / "bench.json"
                    if not path.is_file():
                        raise KeyError(f"no {path} (written by `segprompt bench`)")
                    bench = json.loads(path.read_text())
                    if bench.get(col.bench) is None:
                        raise KeyError(f"{path} has no '{col.bench}'")
                    cv.values.append(float(bench[col.bench]) * col.scale)
                elif not run.done:
                    raise KeyError(f"run {run.dir.name} is {run.state}")
                elif col.at == "best":
                    cv.values.append(metric_value(_best_record(where, run.cfg), cell.metric) * col.scale)
                else:
                    result = json.loads((where / "eval.json").read_text())
                    cv.values.append(metric_value(result, cell.metric, table.categories) * col.scale)
                cv.runs.append(str(where))
            except KeyError as e:
                reasons.append(str(e.args[0]) if e.args else str(e))
        cv.status = "ok" if len(cv.values) == cv.expected else ("partial" if cv.values else "missing")
        cv.reason = reasons[0] if reasons else None
    names = {c.name for c in table.columns}
    for cell in plan.cells:
        g = cell.col.gain
        if g is None or cell.skipped or not {g.base, g.new} <= names:
            continue
        cv = out[(cell.row.name, cell.col.name)]
        base, new = out[(cell.row.name, g.base)].mean, out[(cell.row.name, g.new)].mean
        if base is None or new is None or base == 0:
            cv.reason = f"needs both '{g.base}' and '{g.new}'"
            continue
        cv.values, cv.status = [100.0 * (new - base) / base], "ok"
    rows = list(dict.fromkeys(c.row.name for c in plan.cells))
    return Collected(table, plan.scale, rows, out, plan.seeds_note)
