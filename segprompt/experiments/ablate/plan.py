"""Planning a table: its cells, the runs they need (one per seed), each run's hash-named directory
and its state on disk (``docs/recipes.md``, "Tables"). ``ABLATE_ROOT`` is where run folders go."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from segprompt.config import (
    Recipe,
    config_diff,
    load_recipe,
    run_defining_config,
    shipped_name,
    shipped_recipes,
)
from segprompt.errors import SegpromptError
from segprompt.experiments.ablate.smoke import (
    SmokeProfile,
    load_smoke_profile,
    smoke_overrides,
)
from segprompt.experiments.tables import Column, Row, Table, all_tables, tables_dir
from segprompt.runs.rundir import CKPT_DIR, CONFIG, LAST, failed_start, finished

ABLATE_ROOT = Path("results/ablate")


def select_tables(paper: str = "spm", table: str | None = None, figure: str | None = None) -> list[Table]:
    """The tables of ``paper`` (``spm`` or ``stdc``): one table or figure, or all of them."""
    tables = all_tables()
    papers = sorted({t.paper for t in tables})
    if paper not in papers:
        raise SegpromptError(f"--paper '{paper}' is not one of: {', '.join(papers)}")
    mine = [t for t in tables if t.paper == paper]
    if table is None and figure is None:
        return mine
    kind, number = ("table", table) if table is not None else ("figure", figure)
    chosen = [t for t in mine if t.kind == kind and t.table == str(number)]
    if not chosen:
        have = ", ".join(f"{t.kind} {t.table}" for t in mine)
        raise SegpromptError(f"the {paper.upper()} paper has no {kind} {number} in {tables_dir()} "
                             f"(it has: {have}); `segprompt ablate --list` lists every table")
    return chosen


def config_hash(cfg: Recipe, load_from: str | None = None) -> str:
    """SHA-256 of the resolved config (keys sorted, so their order in a recipe is irrelevant),
    and of the run it starts from, if any."""
    text = yaml.safe_dump(run_defining_config(cfg), sort_keys=True)
    if load_from:
        text += f"load_from: {load_from}\n"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(eq=False)  # a run is itself: compared by identity
class Run:
    """One training run: a recipe with overrides (cell, seed, smoke), in its hash-named directory."""

    recipe: Path
    overrides: list[str]
    label: str  # recipe stem [+ seed], the readable part of the directory name
    cfg: Recipe | None  # None when the recipe file does not exist
    hash: str | None
    dir: Path
    load_from: Run | None = None  # a run whose best checkpoint initialises this one
    state: str = "missing"
    iteration: int | None = None  # last logged iteration of an unfinished run
    result_dir: Path | None = None  # where the finished run lives (this dir or another table's)
    users: list[str] = field(default_factory=list)  # "row / column" of the cells it feeds

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def init_checkpoint(self) -> Path | None:
        if self.load_from is None:
            return None
        return (self.load_from.result_dir or self.load_from.dir) / CKPT_DIR / "best.pt"


@dataclass
class Cell:
    row: Row
    col: Column
    index: int  # column index
    runs: list[Run]  # one per seed (empty for params/gain/reference columns)
    metric: str | None = None  # for metric columns, after the smoke mapping
    recipe: Path | None = None
    overrides: list[str] = field(default_factory=list)
    skipped: bool = False  # the paper leaves it empty


@dataclass
class Plan:
    table: Table
    scale: str
    root: Path  # this table's run folder
    cells: list[Cell]
    runs: list[Run]  # unique, every dependency before the runs that need it
    seeds_note: str | None = None


def _seed_values(table: Table, col: Column, seeds: int | None) -> tuple[str | None, list[int | None], int]:
    s = table.seeds_of(col)
    if s is None:
        return None, [None], 1
    values = s.values[:seeds] if seeds is not None else s.values
    return s.key, values, len(s.values)


def _label(recipe: Path, seed_key: str | None, seed: int | None) -> str:
    label = recipe.stem
    if seed_key is not None:
        label += f"-{seed_key.rsplit('.', 1)[-1]}{seed}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def recipe_key(path: Path) -> str:
    return shipped_name(path) or str(path)


@dataclass
class _Runs:
    """The runs of one plan, unique by config hash, in the order they were first asked for."""

    table: Table
    folder: Path  # this table's run folder
    root: Path  # every table's run folders (a finished run elsewhere is reused)
    profile: SmokeProfile | None
    data_root: Path
    by_key: dict[str, Run] = field(default_factory=dict)
    order: list[Run] = field(default_factory=list)

    def get(self, recipe: Path, overrides: list[str], seed_key: str | None, seed: int | None) -> Run:
        label = _label(recipe, seed_key, seed)
        if not recipe.is_file():
            key = f"missing:{recipe}:{overrides}"
            if key not in self.by_key:
                self._add(key, Run(recipe, overrides, label, None, None, self.folder / f"{label}-<hash>",
                                   state="recipe missing"))
            return self.by_key[key]
        full = list(overrides)
        if self.profile is not None:
            full += smoke_overrides(recipe, overrides, self.profile, self.data_root)
        cfg = load_recipe(recipe, full)
        dep = None
        dep_recipe = self.table.load_from.get(recipe_key(recipe))
        if dep_recipe is not None:  # its first stage, with the same seed
            seed_over = [o for o in overrides if seed_key is not None and o.startswith(f"{seed_key}=")]
            dep = self.get(shipped_recipes() / dep_recipe, seed_over, seed_key, seed)
        h = config_hash(cfg, dep.hash if dep is not None else None)
        if h not in self.by_key:
            run = Run(recipe, full, label, cfg, h, self.folder / f"{label}-{h[:12]}", load_from=dep)
            refresh_state(run, self.root)
            self._add(h, run)
        return self.by_key[h]

    def _add(self, key: str, run: Run) -> None:
        self.by_key[key] = run
        self.order.append(run)


def _chosen_rows(table: Table, rows: list[str] | None) -> list[Row]:
    if not rows:
        return table.rows
    names = [r.name for r in table.rows]
    unknown = [r for r in rows if r not in names]
    if unknown:
        raise SegpromptError(f"--rows: {unknown} not among the rows of {table.id}: {', '.join(names)}")
    return [r for r in table.rows if r.name in rows]


def _fill(cell: Cell, table: Table, runs: _Runs, seeds: int | None) -> None:
    """The runs ``cell`` reads (and, for a metric cell, its metric after the smoke mapping)."""
    row, col = cell.row, cell.col
    if cell.skipped or col.kind not in ("params", "metric", "bench"):
        return
    if col.kind == "params" and col.average:  # one count per averaged recipe; the cell shows their mean
        cell.runs = [runs.get(recipe, over, None, None) for recipe, over in table.cells(row, col)]
        cell.recipe, cell.overrides = table.cells(row, col)[0]
        return
    try:
        cell.recipe, cell.overrides = table.cell(row, col)
    except SegpromptError:
        if col.kind == "params":
            return
        raise
    if col.kind == "metric":
        metric = table.metric(row, col)
        cell.metric = runs.profile.metrics.get(metric, metric) if runs.profile is not None else metric
    # parameters and benchmarks do not depend on the seed: one run
    seed_key, values, _ = _seed_values(table, col, seeds if col.kind == "metric" else 1)
    for seed in values:
        over = [*cell.overrides, *([f"{seed_key}={seed}"] if seed_key is not None else [])]
        run = runs.get(cell.recipe, over, seed_key, seed)
        if col.kind != "params":
            run.users.append(f"{row.name} / {col.name}")
        cell.runs.append(run)


def _needed(order: list[Run]) -> list[Run]:
    """The runs a metric or bench cell reads, and those another needed run starts from (first)."""
    needed: list[Run] = []
    pending = [r for r in order if r.users]
    for run in pending:
        chain = []
        while run is not None:
            chain.append(run)
            run = run.load_from
        needed += [r for r in reversed(chain) if r not in needed]
    return needed


def _seeds_note(table: Table, cells: list[Cell], seeds: int | None) -> str | None:
    if seeds is None:
        return None
    cut = [c for c in {c.col.name: c for c in cells}.values()
           if c.col.kind == "metric" and table.seeds_of(c.col) and len(table.seeds_of(c.col).values) > seeds]
    if not cut:
        return None
    return f"first {seeds} seed(s) of each cell (the paper: {len(table.seeds_of(cut[0].col).values)})"


def build_plan(table: Table, *, scale: str = "full", root: Path = ABLATE_ROOT, rows: list[str] | None = None,
               seeds: int | None = None, data_root: Path = Path("data")) -> Plan:
    """Every cell of ``table`` and the runs it needs, with their on-disk state."""
    if scale not in ("full", "smoke"):
        raise SegpromptError(f"--scale '{scale}' is not one of: full, smoke")
    profile = load_smoke_profile() if scale == "smoke" else None
    if profile is not None and seeds is None:
        seeds = profile.seeds
    if seeds is not None and seeds < 1:
        raise SegpromptError(f"--seeds {seeds}: keep at least one seed per cell")
    folder = Path(root) / (table.id + ("_smoke" if scale == "smoke" else ""))
    runs = _Runs(table, folder, Path(root), profile, data_root)
    cells = [Cell(row, col, i, [], skipped=col.name in row.skip)
             for row in _chosen_rows(table, rows) for i, col in enumerate(table.columns)]
    # runs of metric and bench cells first, so a run keeps the name (seed included) they give it
    for cell in sorted(cells, key=lambda c: c.col.kind == "params"):
        _fill(cell, table, runs, seeds)
    return Plan(table, scale, folder, cells, _needed(runs.order), _seeds_note(table, cells, seeds))


def _check_config(run: Run, directory: Path) -> None:
    diff = config_diff(load_recipe(directory / CONFIG), run.cfg, limit=5)
    if diff:
        raise SegpromptError(
            f"'{directory / CONFIG}' is not the config of the cell this directory is named after (on disk vs "
            f"expected: {diff}). Something other than `segprompt ablate` wrote there; move '{directory}' elsewhere "
            f"and re-run")


def _last_iteration(directory: Path) -> int | None:
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            last = json.loads(line).get("iter", last)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return last


def refresh_state(run: Run, root: Path = ABLATE_ROOT) -> None:
    """Read the run's state from disk; a finished run of the same config elsewhere counts."""
    if run.cfg is None:
        run.state = "recipe missing"
        return
    d = run.dir
    run.result_dir, run.iteration = None, None
    if (d / CONFIG).is_file():
        _check_config(run, d)
        if finished(d) and (d / "eval.json").is_file():  # its end record, not eval.json alone (docs/runs.md)
            run.state, run.result_dir = "done", d
            return
        if (d / CKPT_DIR / LAST).is_file():
            run.state = "interrupted"
        else:  # a failed start (no training record) starts again as new; train accepts its folder
            run.state = "missing" if failed_start(d) else "started"
        run.iteration = _last_iteration(d)
    elif d.is_dir() and not failed_start(d):
        raise SegpromptError(f"'{d}' holds files but no {CONFIG}: it is not a run of this cell; "
                             f"move it elsewhere and re-run")
    else:
        run.state = "missing"
    for other in sorted(Path(root).glob(f"*/*-{run.hash[:12]}")):
        if other != d and finished(other) and (other / "eval.json").is_file() and (other / CONFIG).is_file():
            _check_config(run, other)
            run.state, run.result_dir, run.iteration = "done", other, None
            return


def missing_inputs(plan: Plan) -> list[str]:
    """What the unfinished runs need that is not there: a prepared dataset (full scale), a weights
    file, the CLIP file. One line per missing input, with the runs that need it and how to get it."""
    need: dict[str, list[str]] = {}
    for r in plan.runs:
        if r.done or r.cfg is None:
            continue
        root = Path(r.cfg.data.root)
        if plan.scale == "full" and not root.exists():
            need.setdefault(f"data.root '{root}': prepare it with `segprompt prepare {r.cfg.data.dataset} --out "
                            f"{root}` (data_scripts/)", []).append(r.label)
        if r.cfg.model.pretrained and not Path(r.cfg.model.pretrained).is_file():
            need.setdefault(f"model.pretrained '{r.cfg.model.pretrained}': put the weights file there "
                            f"(docs/recipes.md)", []).append(r.label)
        clip = (r.cfg.model.backbone.get("text") or {}).get("clip_weights")
        if clip and not Path(clip).is_file() and not (Path(clip).parent / "text_embeddings").is_dir():
            need.setdefault(f"model.backbone.text.clip_weights '{clip}': put OpenAI's CLIP RN50.pt there",
                            []).append(r.label)
    return [f"{what} (needed by {len(runs)} run(s): {', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''})"
            for what, runs in sorted(need.items())]


def remaining_work(plan: Plan) -> tuple[int, int, int]:
    """(runs to train, their iterations left, the images those iterations read): the size of the job."""
    todo = [r for r in plan.runs if not r.done and r.cfg is not None]
    iters = [max(r.cfg.schedule.iters - (r.iteration or 0), 0) for r in todo]
    return len(todo), sum(iters), sum(i * r.cfg.data.batch_size for i, r in zip(iters, todo))
