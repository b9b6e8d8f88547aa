"""`segprompt ablate`: a paper's table as a grid of runs, planned, run, collected and exported.

A table (``recipes/tables/*.yaml``, :mod:`segprompt.experiments.tables`) names the recipe and overrides of
each cell and the paper's value. Each cell becomes one run per seed. A run's directory is named by
the SHA-256 of its resolved config (overrides, seed and smoke transform applied):
``results/ablate/<paper>_table<N>/<recipe>[-<seed>]-<hash12>/``. Re-running ``ablate`` therefore
skips finished runs (``eval.json`` present), resumes interrupted ones (``checkpoints/last.pt``
without ``eval.json``) and never mixes runs of different configs; a finished run of the same config
in another table's folder is reused. A cell whose directory another process holds locked (a run
in progress, see segprompt/engine/runlock.py) is left to it, so two ``ablate`` never run one cell twice.

Runs are launched sequentially in this process (``local``), each under ``torchrun`` (``torchrun``)
or as Slurm jobs through submitit (``slurm``). Collection reads the run directories and gives, per
cell, the mean ± sample standard deviation (ddof = 1) over seeds beside the paper's value and the
difference; it writes CSV, Markdown and LaTeX (and a PNG where the table has a ``plot``).

``--scale smoke`` shrinks every cell with ``recipes/tables/smoke/profile.yaml`` (synthetic data,
small networks of the same family, 60 iterations) so the machinery runs on a CPU in minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import torch
import yaml

from segprompt.config import (Recipe, load_recipe, load_yaml_as, resolve_recipe, resolve_tree, run_defining_config,
                              shipped_name, shipped_recipes)
from segprompt.engine.metrics import category_iou
from segprompt.engine import runlock
from segprompt.engine.rundir import CKPT_DIR, CONFIG, LAST, failed_start
from segprompt.errors import RunCrashed, RunInterrupted, SegpromptError
from segprompt.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from segprompt.experiments.tables import Column, Row, Table, all_tables, tables_dir

ABLATE_ROOT = Path("results/ablate")
TABLES_OUT = Path("results/tables")
SMOKE_BANNER = "SMOKE SCALE: synthetic data, tiny schedules — not comparable to the paper"
MISSING = "—"
# Slurm states of a job that will still write to its run directory
_LIVE_JOB_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


# ----------------------------------------------------------------------------------------------
# Selecting tables


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


# ----------------------------------------------------------------------------------------------
# Smoke scale


@dataclass
class SyntheticOptions:
    image_size: int = 64
    train: int = 16
    val: int = 8


@dataclass
class StandIn:
    classes: int  # background included
    seed: int = 0


@dataclass
class SmokeProfile:
    synthetic: SyntheticOptions = field(default_factory=SyntheticOptions)
    datasets: dict[str, StandIn] = field(default_factory=dict)  # data.dataset -> its synthetic stand-in
    metrics: dict[str, str] = field(default_factory=dict)  # metric -> the stand-in's metric
    components: dict[str, dict] = field(default_factory=dict)  # component name -> options merged in
    set: list[str] = field(default_factory=list)  # overrides of every cell
    seeds: int | None = None  # keep the first N seeds of a cell; null = all


def smoke_profile_path() -> Path:
    return tables_dir() / "smoke" / "profile.yaml"


def load_smoke_profile(path: Path | None = None) -> SmokeProfile:
    path = path or smoke_profile_path()
    profile = load_yaml_as(path, SmokeProfile)
    for name, spec in profile.datasets.items():  # the schema checker leaves mapping values as read
        if not (isinstance(spec, dict) and isinstance(spec.get("classes"), int) and set(spec) <= {"classes", "seed"}):
            raise SegpromptError(f"{path}: datasets.{name} must be {{classes: K, seed: S}}, got {spec!r}")
        profile.datasets[name] = StandIn(**spec)
    return profile


def smoke_root(data_root: Path, dataset: str) -> Path:
    return Path(data_root) / "ablate_smoke" / dataset


def smoke_overrides(recipe: Path, overrides: list[str], profile: SmokeProfile, data_root: Path) -> list[str]:
    """The overrides that turn a cell into its smoke version (added after the cell's own)."""
    tree, _ = resolve_tree(recipe, overrides)
    dataset = tree["data"]["dataset"]
    if dataset not in profile.datasets:
        raise SegpromptError(f"{smoke_profile_path()}: 'datasets' has no synthetic stand-in for data.dataset "
                             f"'{dataset}' (recipe {recipe}); add '{dataset}: <classes>' to it")
    k = profile.datasets[dataset].classes
    out = ["data.dataset=synthetic", f"data.num_classes={k}", f"data.root={smoke_root(data_root, dataset)}"]
    model = tree["model"]
    parts = [("model.backbone", model["backbone"]), ("model.decode_head", model["decode_head"]),
             *((f"model.aux_heads.{i}", h) for i, h in enumerate(model["aux_heads"])), ("tuning", tree["tuning"])]
    for prefix, spec in parts:
        for key, value in profile.components.get(spec["name"], {}).items():
            out.append(f"{prefix}.{key}={json.dumps(value)}")
    return [*out, *profile.set]


def prepare_smoke_data(runs: list[Run], profile: SmokeProfile) -> None:
    """Generate the synthetic stand-ins the runs read (idempotent: an existing one is reused)."""
    from segprompt.data.synthetic import generate_synthetic

    s = profile.synthetic
    for root in sorted({r.cfg.data.root for r in runs if r.cfg is not None}):
        spec = profile.datasets[Path(root).name]
        generate_synthetic(root, seed=spec.seed, num_classes=spec.classes, image_size=(s.image_size, s.image_size),
                           counts={"train": s.train, "val": s.val, "test": 0})


# ----------------------------------------------------------------------------------------------
# Runs and their directories


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


def _recipe_key(path: Path) -> str:
    return shipped_name(path) or str(path)


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
    chosen = table.rows
    if rows:
        names = [r.name for r in table.rows]
        unknown = [r for r in rows if r not in names]
        if unknown:
            raise SegpromptError(f"--rows: {unknown} not among the rows of {table.id}: {', '.join(names)}")
        chosen = [r for r in table.rows if r.name in rows]
    folder = Path(root) / (table.id + ("_smoke" if scale == "smoke" else ""))
    runs: dict[str, Run] = {}
    order: list[Run] = []

    def get_run(recipe: Path, overrides: list[str], seed_key: str | None, seed: int | None) -> Run:
        label = _label(recipe, seed_key, seed)
        if not recipe.is_file():
            key = f"missing:{recipe}:{overrides}"
            if key not in runs:
                runs[key] = Run(recipe, overrides, label, None, None, folder / f"{label}-<hash>",
                                state="recipe missing")
                order.append(runs[key])
            return runs[key]
        full = list(overrides)
        if profile is not None:
            full += smoke_overrides(recipe, overrides, profile, data_root)
        cfg = load_recipe(recipe, full)
        dep = None
        dep_recipe = table.load_from.get(_recipe_key(recipe))
        if dep_recipe is not None:
            seed_over = [o for o in overrides if seed_key is not None and o.startswith(f"{seed_key}=")]
            dep = get_run(shipped_recipes() / dep_recipe, seed_over, seed_key, seed)
        h = config_hash(cfg, dep.hash if dep is not None else None)
        if h not in runs:
            run = Run(recipe, full, label, cfg, h, folder / f"{label}-{h[:12]}", load_from=dep)
            refresh_state(run, Path(root))
            runs[h] = run
            order.append(run)
        return runs[h]

    cells = [Cell(row, col, i, [], skipped=col.name in row.skip) for row in chosen for i, col in enumerate(table.columns)]
    # runs of metric and bench cells first, so a run keeps the name (seed included) they give it
    for cell in sorted(cells, key=lambda c: c.col.kind == "params"):
        row, col = cell.row, cell.col
        if cell.skipped or col.kind not in ("params", "metric", "bench"):
            continue
        if col.kind == "params" and col.average:  # one count per averaged recipe; the cell shows their mean
            for recipe, over in table.cells(row, col):
                cell.runs.append(get_run(recipe, over, None, None))
            cell.recipe, cell.overrides = table.cells(row, col)[0]
            continue
        try:
            cell.recipe, cell.overrides = table.cell(row, col)
        except SegpromptError:
            if col.kind == "params":
                continue
            raise
        if col.kind == "metric":
            metric = table.metric(row, col)
            cell.metric = profile.metrics.get(metric, metric) if profile is not None else metric
        # parameters and benchmarks do not depend on the seed: one run
        seed_key, values, _ = _seed_values(table, col, seeds if col.kind == "metric" else 1)
        for seed in values:
            over = [*cell.overrides, *([f"{seed_key}={seed}"] if seed_key is not None else [])]
            run = get_run(cell.recipe, over, seed_key, seed)
            if col.kind != "params":
                run.users.append(f"{row.name} / {col.name}")
            cell.runs.append(run)
    # a run is needed when a metric or bench cell reads it, or another needed run starts from it
    needed: list[Run] = []

    def need(run: Run) -> None:
        if run.load_from is not None:
            need(run.load_from)
        if run not in needed:
            needed.append(run)

    for run in order:
        if run.users:
            need(run)
    note = None
    if seeds is not None:
        cut = [c for c in {c.col.name: c for c in cells}.values()
               if c.col.kind == "metric" and table.seeds_of(c.col) and len(table.seeds_of(c.col).values) > seeds]
        if cut:
            note = f"first {seeds} seed(s) of each cell (the paper: {len(table.seeds_of(cut[0].col).values)})"
    return Plan(table, scale, folder, cells, needed, note)


def _check_config(run: Run, directory: Path) -> None:
    saved = load_recipe(directory / CONFIG)
    a, b = run_defining_config(saved), run_defining_config(run.cfg)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        shown = "; ".join(f"{k}: on disk {a.get(k)!r}, expected {b.get(k)!r}" for k in diff[:5])
        raise SegpromptError(
            f"'{directory / CONFIG}' is not the config of the cell this directory is named after ({shown}). "
            f"Something other than `segprompt ablate` wrote there; move '{directory}' elsewhere and re-run")


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
        if (d / "eval.json").is_file():
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
        if other != d and (other / "eval.json").is_file() and (other / CONFIG).is_file():
            _check_config(run, other)
            run.state, run.result_dir, run.iteration = "done", other, None
            return


# ----------------------------------------------------------------------------------------------
# Launching


def train_cell(recipe: str, overrides: list[str], out: str, load_from: str | None = None) -> str:
    """Start, restart or resume one run in ``out`` (what every launcher executes)."""
    from segprompt.engine.train import train

    out_dir = Path(out)
    resuming = (out_dir / CKPT_DIR / LAST).is_file()
    return str(train(recipe, overrides, out=out_dir, resume="auto",
                     load_from=None if resuming or load_from is None else load_from))


def _shown(path: Path) -> str:
    """How a printed command names a recipe: a shipped one by its name (it resolves from any working
    directory), else relative to the working directory when inside it, else as given."""
    name = shipped_name(path)
    with contextlib.suppress(SegpromptError):
        if name is not None and resolve_recipe(name).resolve() == Path(path).resolve():
            return name
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def command(run: Run, launcher: str = "local", gpus: int = 1) -> list[str]:
    """The shell command that (re)starts or resumes ``run`` (what ``--plan`` prints)."""
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                  "-m", "segprompt"]
    else:
        prefix = ["segprompt"]
    cmd = [*prefix, "train", _shown(run.recipe)]
    for o in run.overrides:
        cmd += ["--set", o]
    cmd += ["--out", str(run.dir)]
    if run.state in ("interrupted", "started"):
        cmd += ["--resume", "auto"]
    if run.load_from is not None and run.state != "interrupted":
        cmd += ["--load-from", str(run.init_checkpoint)]
    return cmd


class CellJob(submitit.helpers.Checkpointable):
    """A Slurm job of one run. On preemption or time-out submitit requeues the same call, which
    resumes from ``checkpoints/last.pt``. With several tasks, each is one DDP process."""

    def __call__(self, recipe: str, overrides: list[str], out: str, load_from: str | None) -> str:
        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return train_cell(recipe, overrides, out, load_from)


@dataclass
class RunReport:
    launched: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)  # finished already
    failed: list[tuple[Run, str]] = field(default_factory=list)
    submitted: list[tuple[Run, str]] = field(default_factory=list)  # (run, job id)
    waiting: list[tuple[Run, str]] = field(default_factory=list)  # not run: why


def preflight(plan: Plan) -> None:
    """Refuse to start when a recipe, a dataset or a pretrained file is missing (nothing runs)."""
    todo = [r for r in plan.runs if not r.done]
    missing = sorted({_recipe_key(r.recipe) for r in todo if r.cfg is None})
    if missing:
        raise SegpromptError(
            f"{plan.table.id}: cannot run cells whose recipe is missing: {', '.join(missing)} (under {shipped_recipes()}). "
            f"Write them, or run the other rows with --rows")
    problems = []
    for r in todo:
        root = Path(r.cfg.data.root)
        if plan.scale == "full" and not root.exists():
            problems.append(f"data.root '{root}' ({r.label}): prepare it with `segprompt prepare "
                            f"{r.cfg.data.dataset} --out {root}`")
        if r.cfg.model.pretrained and not Path(r.cfg.model.pretrained).is_file():
            problems.append(f"model.pretrained '{r.cfg.model.pretrained}' ({r.label}): put the weights file there")
        clip = (r.cfg.model.backbone.get("text") or {}).get("clip_weights")
        if clip and not Path(clip).is_file() and not (Path(clip).parent / "text_embeddings").is_dir():
            problems.append(f"model.backbone.text.clip_weights '{clip}' ({r.label}): put OpenAI's CLIP RN50.pt there")
    if problems:
        raise SegpromptError(f"{plan.table.id}: cannot start: " + "; ".join(sorted(set(problems))))


def run_plan(plan: Plan, *, launcher: str = "local", gpus: int = 1, nodes: int = 1, partition: str | None = None,
             time_min: int = 60 * 24, wait: bool = False, cluster: str = "slurm", echo: Callable[[str], None] = print,
             quiet: bool = True) -> RunReport:
    """Launch every run of ``plan`` that has not finished, dependencies first.

    ``local``: one after another in this process (console output to ``_logs/`` when ``quiet``);
    ``torchrun``: each in ``torch.distributed.run`` with ``gpus`` processes; ``slurm``: one submitit
    job each (``cluster`` "local" or "debug" runs the same submission on this machine)."""
    if launcher not in ("local", "torchrun", "slurm"):
        raise SegpromptError(f"--launcher '{launcher}' is not one of: local, torchrun, slurm")
    preflight(plan)
    if plan.scale == "smoke":
        prepare_smoke_data(plan.runs, load_smoke_profile())
    report = RunReport()
    todo = [r for r in plan.runs if not r.done]
    report.skipped = [r for r in plan.runs if r.done]
    if launcher == "slurm":
        _submit(plan, todo, report, gpus=gpus, nodes=nodes, partition=partition, time_min=time_min, wait=wait,
                cluster=cluster, echo=echo)
        return report
    for i, run in enumerate(todo, 1):
        if run.load_from is not None and not run.load_from.done:
            report.waiting.append((run, f"its initialisation run {run.load_from.label} has not finished"))
            continue
        # the run directory's lock (runlock.py) is what keeps two `ablate`s from running one cell twice
        busy = runlock.holder(run.dir)
        if busy is not None:
            echo(f"[{i}/{len(todo)}] {run.label}: running in another process ({busy}); not started")
            report.waiting.append((run, f"running in another process ({busy})"))
            continue
        what = {"missing": "start", "started": "restart", "interrupted": f"resume (iteration {run.iteration})"}
        echo(f"[{i}/{len(todo)}] {what.get(run.state, run.state)} {run.label} -> {run.dir}")
        start = time.perf_counter()
        try:
            if launcher == "local":
                _run_local(plan, run, quiet)
            else:
                _run_torchrun(plan, run, gpus)
        except runlock.RunDirInUse as e:  # it started elsewhere since the check above
            report.waiting.append((run, str(e)))
            echo(f"    not started: {e}")
            continue
        except RunInterrupted as e:
            raise RunInterrupted(f"{e} (or run this `segprompt ablate` again: it resumes {run.label})",
                                 e.signum) from None
        except Exception as e:  # one failed cell must not stop the grid; it is reported at the end
            msg = str(e) if isinstance(e, (SegpromptError, RunCrashed)) else f"{type(e).__name__}: {e}"
            report.failed.append((run, msg))
            echo(f"    failed: {msg}")
            continue
        finally:
            refresh_state(run, plan.root.parent)
        report.launched.append(run)
        echo(f"    {run.state} in {time.perf_counter() - start:.1f}s")
    return report


def _log_path(plan: Plan, run: Run) -> Path:
    return plan.root / "_logs" / f"{run.dir.name}.log"


def _run_local(plan: Plan, run: Run, quiet: bool) -> None:
    args = (str(run.recipe), run.overrides, str(run.dir), str(run.init_checkpoint) if run.load_from else None)
    if not quiet:
        train_cell(*args)
        return
    log = _log_path(plan, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            train_cell(*args)
        except Exception:
            traceback.print_exc(file=f)
            raise


def _run_torchrun(plan: Plan, run: Run, gpus: int) -> None:
    if run.state == "started" and run.load_from is not None:
        # `train` restarts such a run in place, but its command line cannot combine --resume with
        # --load-from; the folder holds no checkpoint, so it is moved aside (nothing is deleted)
        aside = run.dir.with_name(f"{run.dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(run.dir, aside)
        run.state = "missing"
    log = _log_path(plan, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        res = subprocess.run(command(run, "torchrun", gpus), stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if res.returncode != 0:
        raise SegpromptError(f"torchrun exited with status {res.returncode}; see {log}")


def _job_record(plan: Plan, run: Run) -> Path:
    return plan.root / "_jobs" / f"{run.dir.name}.json"


def _live_job(plan: Plan, run: Run) -> str | None:
    """The id of a Slurm job submitted earlier for this run that is still queued or running."""
    path = _job_record(plan, run)
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if rec.get("cluster") != "slurm":
        return None
    job = submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])
    state = job.watcher.get_state(job.job_id, mode="force")  # asks sacct now
    return rec["job_id"] if state in _LIVE_JOB_STATES else None


def _submit(plan: Plan, todo: list[Run], report: RunReport, *, gpus: int, nodes: int, partition: str | None,
            time_min: int, wait: bool, cluster: str, echo: Callable[[str], None]) -> None:
    if cluster == "slurm" and not partition:
        raise SegpromptError("--launcher slurm needs --partition NAME (the Slurm partition to submit to)")
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise SegpromptError("--launcher slurm: no `sbatch`/`srun` on this machine; run ablate on a Slurm login "
                             "node, or use --launcher local / torchrun")
    folder = plan.root / "_submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    tasks = max(gpus, 1)
    executor.update_parameters(name=f"ablate-{plan.table.id}", timeout_min=time_min, nodes=nodes,
                               tasks_per_node=tasks, gpus_per_node=gpus, slurm_partition=partition,
                               slurm_signal_delay_s=120)
    jobs: dict[str, Any] = {}  # run hash -> job submitted now
    job_ids: dict[str, str] = {}  # run hash -> Slurm job id (submitted now, or earlier and still live)
    for run in todo:
        live = _live_job(plan, run) if cluster == "slurm" else None
        if live is not None:
            echo(f"{run.label}: job {live} is still queued or running; not submitted again")
            report.waiting.append((run, f"job {live} still queued or running"))
            job_ids[run.hash] = live
            continue
        busy = runlock.holder(run.dir)
        if busy is not None:
            echo(f"{run.label}: running in another process ({busy}); not submitted")
            report.waiting.append((run, f"running in another process ({busy})"))
            continue
        dep = run.load_from
        extra: dict[str, Any] = {}
        if dep is not None and not dep.done:
            if dep.hash in job_ids and cluster == "slurm":  # Slurm starts it once the first stage succeeded
                extra = {"dependency": f"afterok:{job_ids[dep.hash]}"}
            elif dep.hash in jobs:  # local executor: wait for the initialisation run here
                _wait(jobs[dep.hash], dep, report)
                refresh_state(dep, plan.root.parent)
            if not dep.done and not extra:
                report.waiting.append((run, f"its initialisation run {dep.label} has not finished"))
                continue
        # each task (DDP process) runs the recipe's data-loading workers beside itself
        executor.update_parameters(cpus_per_task=run.cfg.runtime.num_workers + 1)
        if cluster == "slurm":
            executor.update_parameters(slurm_additional_parameters=extra)
        job = executor.submit(CellJob(), str(run.recipe), run.overrides, str(run.dir),
                              str(run.init_checkpoint) if dep is not None else None)
        jobs[run.hash], job_ids[run.hash] = job, str(job.job_id)
        atomic_write_json(_job_record(plan, run), {"job_id": str(job.job_id), "cluster": cluster,
                                                   "folder": str(folder), "dir": str(run.dir),
                                                   "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        report.submitted.append((run, str(job.job_id)))
        echo(f"submitted {run.label} as job {job.job_id} ({cluster}) -> {run.dir}")
    if wait or cluster != "slurm":
        for run, _ in report.submitted:
            _wait(jobs[run.hash], run, report)
            refresh_state(run, plan.root.parent)
            if run.done and run not in report.launched:
                report.launched.append(run)


def _wait(job: Any, run: Run, report: RunReport) -> None:
    try:
        job.result()
    except Exception as e:  # submitit re-raises the job's error with its traceback as text
        if all(r is not run for r, _ in report.failed):
            report.failed.append((run, f"job {job.job_id}: {str(e).strip().splitlines()[-1]}"))


# ----------------------------------------------------------------------------------------------
# Collecting


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
    from segprompt.engine.build import dataset_meta

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
    from segprompt.measure.params import breakdown, trainable_in

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
            cv.status, cv.reason = "recipe missing", f"{cell.recipe and _recipe_key(cell.recipe)} does not exist"
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


# ----------------------------------------------------------------------------------------------
# Formatting and export


def _num(v: float | None, digits: int, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def ours_text(c: CellValue) -> str:
    if c.status == "skipped":
        return ""
    if c.status == "reference":
        return "n/a"
    if not c.values:
        return MISSING
    text = _num(c.mean, c.digits)
    if c.std is not None:
        text += f"±{_num(c.std, c.digits)}"
    if c.status == "partial":
        text += f" ({len(c.values)}/{c.expected} seeds)"
    return text


def paper_text(c: CellValue) -> str:
    mean, std = parse_paper(c.paper)
    if mean is None:
        return MISSING
    digits = max(c.digits, _decimals(c.paper))
    return _num(mean, digits) + (f"±{_num(std, digits)}" if std is not None else "")


def _decimals(value: Any) -> int:
    text = str(value).partition("±")[0]
    return len(text.partition(".")[2]) if "." in text and "e" not in text.lower() else 0


def cell_text(c: CellValue) -> str:
    """``ours / paper (Δ)`` for one cell."""
    if c.status == "skipped":
        return ""
    text = f"{ours_text(c)} / {paper_text(c)}"
    if c.diff is not None:
        text += f" ({_num(c.diff, c.digits, sign=True)})"
    return text


def caption(col: Collected, banner: bool = True) -> str:
    t = col.table
    text = f"{t.paper.upper()} paper {t.kind.capitalize()} {t.table}: {t.title}"
    if col.scale == "smoke" and banner:
        text = f"{SMOKE_BANNER}. {text}"
    return text


def footer(col: Collected) -> list[str]:
    counted = [c for c in col.cells.values() if c.status not in ("skipped", "reference")]
    lines = [("cells read 'ours / paper (ours − paper)'; ours is the mean ± sample std (ddof=1) over seeds, "
              "a paper 'mean±std' is compared by its mean")]
    missing = col.missing
    lines.append(f"{len(counted) - len(missing)} of {len(counted)} cells complete, {len(missing)} missing or partial "
                 f"({MISSING} = no value yet)")
    if col.seeds_note:
        lines.append(f"seeds: {col.seeds_note}")
    for c in missing[:8]:
        lines.append(f"missing: {c.row} / {c.column}: {c.reason or c.status}")
    if len(missing) > 8:
        lines.append(f"... and {len(missing) - 8} more")
    notes = dict.fromkeys(f"{c.column}: {c.note}" for c in col.cells.values() if c.note)
    lines += [f"note: {n}" for n in notes]
    return lines


def render(col: Collected):
    """A rich table: per cell our value, and beneath it the paper's and the difference."""
    from rich.table import Table as RichTable

    t = col.table
    out = RichTable(title=caption(col), caption="\n".join(footer(col)), caption_justify="left",
                    title_style="bold red" if col.scale == "smoke" else "bold")
    out.add_column("row")
    for c in t.columns:
        out.add_column(c.name, justify="right")
    for r in col.rows:
        cells = []
        for c in t.columns:
            cv = col.cells[(r, c.name)]
            if cv.status == "skipped":
                cells.append("")
                continue
            line2 = f"[dim]paper {paper_text(cv)}"
            if cv.diff is not None:
                line2 += f" ({_num(cv.diff, cv.digits, sign=True)})"
            cells.append(f"{ours_text(cv)}\n{line2}[/]")
        out.add_row(r, *cells)
    return out


def to_frame(col: Collected):
    """Long format, one line per cell (the CSV)."""
    import pandas as pd

    recs = []
    for (row, column), c in col.cells.items():
        recs.append({"table": col.table.id, "scale": col.scale, "row": row, "column": column, "kind": c.kind,
                     "ours_mean": c.mean, "ours_std": c.std, "seeds_done": len(c.values), "seeds_expected": c.expected,
                     "paper": c.paper, "paper_mean": c.paper_mean, "diff": c.diff, "status": c.status,
                     "reason": c.reason, "runs": ";".join(c.runs)})
    return pd.DataFrame(recs)


def wide_frame(col: Collected):
    import pandas as pd

    data = {c.name: [cell_text(col.cells[(r, c.name)]) for r in col.rows] for c in col.table.columns}
    return pd.DataFrame(data, index=pd.Index(col.rows, name="row"))


def export(col: Collected, out_dir: Path = TABLES_OUT) -> list[Path]:
    """Write ``<id>[_smoke].csv``, ``.md``, ``.tex`` (and ``.png`` with a plot) atomically."""
    stem = col.table.id + ("_smoke" if col.scale == "smoke" else "")
    out_dir = Path(out_dir)
    paths = [out_dir / f"{stem}.csv", out_dir / f"{stem}.md", out_dir / f"{stem}.tex"]
    csv = to_frame(col).to_csv(index=False)
    if col.scale == "smoke":
        csv = f"# {SMOKE_BANNER}\n" + csv
    atomic_write_text(paths[0], csv)
    wide = wide_frame(col)
    # Markdown by hand: pandas' to_markdown needs the tabulate package for these few lines
    lines = [f"**{SMOKE_BANNER}**", ""] if col.scale == "smoke" else []
    lines += [caption(col, banner=False), "", "| row | " + " | ".join(wide.columns) + " |",
              "|---|" + "---:|" * len(wide.columns)]
    lines += ["| " + " | ".join([str(i), *(str(v).replace("|", "\\|") for v in r)]) + " |"
              for i, r in zip(wide.index, wide.itertuples(index=False))]
    lines += [""] + [f"- {f}" for f in footer(col)]
    atomic_write_text(paths[1], "\n".join(lines) + "\n")
    styler = wide.rename_axis(None).style.format(escape="latex").format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    tex = styler.to_latex(caption=_latex_escape(caption(col)), hrules=True, label=f"tab:{stem}",
                          column_format="l" + "r" * len(wide.columns))
    atomic_write_text(paths[2], tex)
    if col.table.plot is not None:
        paths.append(out_dir / f"{stem}.png")
        atomic_write_bytes(paths[-1], plot_png(col))
    return paths


def _latex_escape(text: str) -> str:
    # Styler escapes cells and headers but not the caption; these are LaTeX's special characters
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(ch, ch) for ch in text)


def plot_png(col: Collected) -> bytes:
    """Ours (filled) and the paper's (hollow) values of the plotted columns, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = col.table.plot
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, name in enumerate(spec.y):
        colour = f"C{i}"
        ours = [col.cells[(r, name)].mean for r in col.rows]
        paper = [col.cells[(r, name)].paper_mean for r in col.rows]
        if spec.x is None:
            xs = list(range(len(col.rows)))
            ax.plot(xs, [math.nan if v is None else v for v in ours], "o-", color=colour, label=f"{name} (ours)")
            ax.plot(xs, [math.nan if v is None else v for v in paper], "o--", color=colour, mfc="none",
                    label=f"{name} (paper)")
        else:
            for who, ys, xs, style in (("ours", ours, [col.cells[(r, spec.x)].mean for r in col.rows], "o"),
                                       ("paper", paper, [col.cells[(r, spec.x)].paper_mean for r in col.rows], "s")):
                pts = [(x, y, r) for x, y, r in zip(xs, ys, col.rows) if x is not None and y is not None]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=style, color=colour,
                           facecolors=colour if who == "ours" else "none", label=f"{name} ({who})")
                for x, y, r in pts:
                    ax.annotate(r, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if spec.x is None:
        ax.set_xticks(range(len(col.rows)), col.rows, rotation=30 if len(col.rows) > 5 else 0)
    ax.set_xlabel(spec.xlabel or (spec.x or "row"))
    ax.set_ylabel(spec.ylabel or ", ".join(spec.y))
    title = f"{col.table.paper.upper()} {col.table.kind} {col.table.table}"
    if col.scale == "smoke":
        title += "\n" + SMOKE_BANNER
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def render_plan(plan: Plan, launcher: str = "local", gpus: int = 1):
    """The runs of a plan (state, directory, cells fed) and the command of each unfinished one."""
    from rich.table import Table as RichTable

    title = f"{plan.table.id}: {len(plan.runs)} run(s) for {plan.table.kind} {plan.table.table} of the " \
            f"{plan.table.paper.upper()} paper" + (f" — {SMOKE_BANNER}" if plan.scale == "smoke" else "")
    out = RichTable(title=title, caption=f"seeds: {plan.seeds_note}" if plan.seeds_note else None)
    for name in ("#", "run", "state", "directory", "cells"):
        out.add_column(name)
    style = {"done": "green", "interrupted": "yellow", "started": "yellow", "missing": "", "recipe missing": "red"}
    for i, r in enumerate(plan.runs, 1):
        state = r.state + (f" (iter {r.iteration})" if r.iteration else "")
        if r.done and r.result_dir != r.dir:
            state += f" (in {r.result_dir.parent.name})"
        by_row: dict[str, list[str]] = {}
        for user in r.users:
            row, _, column = user.partition(" / ")
            by_row.setdefault(row, []).append(column)
        users = [f"{row}: {', '.join(cols)}" for row, cols in by_row.items()]
        users = users or [f"initialises {', '.join(o.label for o in plan.runs if o.load_from is r)}"]
        shown = "; ".join(users[:3]) + (f"; +{len(users) - 3} rows" if len(users) > 3 else "")
        out.add_row(str(i), r.label, f"[{style[r.state]}]{state}[/]" if style[r.state] else state,
                    str(r.dir), shown)
    commands = []
    for i, r in enumerate(plan.runs, 1):
        if r.cfg is None:
            commands.append(f"# {i}: recipe missing: {r.recipe}")
        elif not r.done:
            commands.append(f"# {i}: {r.label}\n{shlex.join(command(r, launcher, gpus))}")
    bench = [c for c in plan.cells if c.col.kind == "bench" and c.runs]
    if bench:
        commands.append("# bench columns read bench.json (`segprompt bench`) in: "
                        + ", ".join(sorted({str(c.runs[0].dir) for c in bench})))
    return out, commands
