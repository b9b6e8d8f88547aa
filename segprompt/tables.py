"""The papers' tables as data (``recipes/tables/*.yaml``): rows, columns, the recipe behind each
cell and the published values. ``count-params`` compares the parameter columns; ``ablate`` runs
and collects the metric columns.

A cell's recipe is the column's ``recipe`` (a template where ``{key}`` is the row's key) or else
the row's; its overrides are the row's ``set`` then the column's. Paper values are numbers, or
strings like ``"76.07±0.57"`` (mean ± std over seeds), or null where the paper has no value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segprompt.config import load_yaml_as
from segprompt.errors import SegpromptError

TABLES_DIR = Path(__file__).resolve().parents[1] / "recipes" / "tables"
RECIPES_DIR = TABLES_DIR.parent


@dataclass
class SeedsConfig:
    key: str  # the recipe key a seed sets, e.g. runtime.seed or data.subset_seed
    values: list[int]


@dataclass
class Column:
    name: str
    params: str | None = None  # backbone | prompt | head: a trainable-parameter count in millions
    metric: str | None = None  # a key of eval.json (mIoU, ...), or "Dice.<class>" for one class
    recipe: str | None = None
    set: list[str] = field(default_factory=list)
    seeds: SeedsConfig | None = None


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
class Table:
    paper: str
    table: str
    title: str
    columns: list[Column]
    rows: list[Row]
    seeds: SeedsConfig | None = None
    notes: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def cell(self, row: Row, col: Column) -> tuple[Path, list[str]]:
        template = col.recipe or row.recipe
        if template is None:
            raise SegpromptError(f"{self.path}: row '{row.name}' column '{col.name}' names no recipe")
        return RECIPES_DIR / template.format(key=row.key), [*row.set, *col.set]

    def note(self, row: Row, col: Column) -> str | None:
        return row.notes.get(col.name) or self.notes.get(col.name)


def load_table(path: Path) -> Table:
    table = load_yaml_as(path, Table)
    table.path = str(path)
    for row in table.rows:
        if len(row.paper) != len(table.columns):
            raise SegpromptError(f"{path}: row '{row.name}' has {len(row.paper)} paper values for "
                                 f"{len(table.columns)} columns")
    return table


def all_tables() -> list[Table]:
    return [load_table(p) for p in sorted(TABLES_DIR.glob("*.yaml"))]
