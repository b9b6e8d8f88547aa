"""The papers' tables as data (``recipes/tables/*.yaml``, shipped with the recipes): rows, columns,
the recipe behind each cell (relative to the shipped recipes) and the published values.
``count-params`` compares the parameter columns; ``ablate`` runs and collects the metric columns.

A cell's recipe is the column's ``recipe`` (a template where ``{key}`` is the row's key) or else
the row's; its overrides are the row's ``set`` then the column's. Paper values are numbers, or
strings like ``"76.07±0.57"`` (mean ± std over seeds), or null where the paper has no value.

What a column shows is its kind: ``params`` (a trainable-parameter group, counted without
training), ``metric`` (a value of the run's ``eval.json``), ``bench`` (a key of the run's
``bench.json``, written by ``segprompt bench``), ``gain`` (our relative gain of one column over
another, in percent) or none (the paper's number only). ``kind: figure`` marks a figure of the
paper; ``plot`` draws any table or figure (y columns against the rows, or against an x column).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segprompt.config import load_yaml_as, shipped_recipes
from segprompt.errors import SegpromptError

KINDS = ("params", "metric", "bench", "gain")  # what a column shows (see the module docstring)


@dataclass
class SeedsConfig:
    key: str  # the recipe key a seed sets, e.g. runtime.seed or data.subset_seed
    values: list[int]


@dataclass
class GainConfig:
    base: str  # column of the reference values
    new: str  # column of the compared values; the gain is (new - base) / base x 100


@dataclass
class Column:
    name: str
    params: str | None = None  # backbone | prompt | head | trainable (all groups): trainable parameters, in millions
    # params columns only: recipe templates whose counts are averaged (the recognition table's
    # "Avg Params" over its three datasets), instead of the one `recipe`
    average: list[str] = field(default_factory=list)
    # a key of eval.json (mIoU, ...); "<stat>.<class>" for one class (stat: IoU, Acc, Dice, Fscore,
    # Precision, Recall, pixels, or share = % of the labelled pixels); "categoryIoU.<category>" for a
    # table's `categories`; `{key}` is the row's key
    metric: str | None = None
    bench: str | None = None  # a key of bench.json: fps, latency_ms, flops_mmcv, flops_torch, params, ...
    gain: GainConfig | None = None
    scale: float = 1.0  # ours = raw value x scale, in the paper's unit (1e-6 for M parameters, 1e-9 for G)
    digits: int = 2  # decimals shown
    at: str = "last"  # metric of the last evaluation (eval.json) or the best one (metrics.jsonl, top-level keys)
    recipe: str | None = None
    set: list[str] = field(default_factory=list)
    seeds: SeedsConfig | None = None

    @property
    def kind(self) -> str | None:
        for k in KINDS:
            if getattr(self, k) is not None:
                return k
        return None


@dataclass
class Row:
    name: str
    paper: list[Any]
    key: str = ""
    recipe: str | None = None
    set: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # column -> why ours differs from the paper
    skip: list[str] = field(default_factory=list)  # columns the paper leaves empty for this row


@dataclass
class PlotConfig:
    y: list[str]  # columns drawn
    x: str | None = None  # a column (scatter of x against y), or null: the rows in order
    xlabel: str | None = None
    ylabel: str | None = None


@dataclass
class Table:
    paper: str
    table: str
    title: str
    columns: list[Column]
    rows: list[Row]
    seeds: SeedsConfig | None = None
    notes: dict[str, str] = field(default_factory=dict)
    kind: str = "table"  # table | figure
    plot: PlotConfig | None = None
    categories: dict[str, list[str]] = field(default_factory=dict)  # category -> its classes
    # recipe -> recipe whose finished run (checkpoints/best.pt, same seed) initialises its runs, as
    # MMSegmentation's load_from (the STDC paper's second training stage starts from the first)
    load_from: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def id(self) -> str:
        """``spm_table4``, ``stdc_figure5``: names the table's run and export folders."""
        return f"{self.paper}_{self.kind}{self.table}"

    def cell(self, row: Row, col: Column) -> tuple[Path, list[str]]:
        template = col.recipe or row.recipe
        if template is None:
            raise SegpromptError(f"{self.path}: row '{row.name}' column '{col.name}' names no recipe")
        return shipped_recipes() / template.format(key=row.key), [*row.set, *col.set]

    def cells(self, row: Row, col: Column) -> list[tuple[Path, list[str]]]:
        """Every recipe behind a cell: the ones a column averages over, else :meth:`cell`'s."""
        if col.average:
            return [(shipped_recipes() / t.format(key=row.key), [*row.set, *col.set]) for t in col.average]
        return [self.cell(row, col)]

    def metric(self, row: Row, col: Column) -> str | None:
        return None if col.metric is None else col.metric.format(key=row.key)

    def seeds_of(self, col: Column) -> SeedsConfig | None:
        return col.seeds or self.seeds

    def note(self, row: Row, col: Column) -> str | None:
        return row.notes.get(col.name) or self.notes.get(col.name)


def load_table(path: Path) -> Table:
    table = load_yaml_as(path, Table)
    table.path = str(path)
    names = [c.name for c in table.columns]
    if table.kind not in ("table", "figure"):
        raise SegpromptError(f"{path}: 'kind' is {table.kind!r}; use table or figure")
    for col in table.columns:
        kinds = [k for k in KINDS if getattr(col, k) is not None]
        if len(kinds) > 1:
            raise SegpromptError(f"{path}: column '{col.name}' has {' and '.join(kinds)}; give it one of them")
        if col.at not in ("last", "best"):
            raise SegpromptError(f"{path}: column '{col.name}': 'at' is {col.at!r}; use last or best")
        if col.gain is not None and not {col.gain.base, col.gain.new} <= set(names):
            raise SegpromptError(f"{path}: column '{col.name}': gain names a column not in {names}")
    for row in table.rows:
        if len(row.paper) != len(table.columns):
            raise SegpromptError(f"{path}: row '{row.name}' has {len(row.paper)} paper values for "
                                 f"{len(table.columns)} columns")
    if table.plot is not None:
        bad = [c for c in [*table.plot.y, table.plot.x] if c is not None and c not in names]
        if bad:
            raise SegpromptError(f"{path}: plot names columns {bad} that the table lacks ({names})")
    return table


def tables_dir() -> Path:
    """The shipped tables: ``tables/`` among the shipped recipes."""
    return shipped_recipes() / "tables"


def all_tables() -> list[Table]:
    return [load_table(p) for p in sorted(tables_dir().glob("*.yaml"))]
