"""``segprompt plot``: training-loss and metric curves of one or several runs, from ``metrics.jsonl``.

One figure with two panels against the iteration: the training ``loss`` (the records written every
``runtime.log_interval``) and one evaluation metric (``mIoU`` by default); one line per run, the same
colour in both panels, labelled by the run directory's name (with as many parent folders as make the
labels differ). A resumed run's ``metrics.jsonl`` holds a ``resume`` event: the records the
interrupted process wrote after that checkpoint are dropped there, so every iteration is drawn once
(docs/watch.md). Matplotlib draws on its Agg canvas (no display needed); the file is written
atomically and an existing one is replaced only with ``force``.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segprompt.errors import SegpromptError
from segprompt.io import atomic_write_bytes

__all__ = ["METRICS_FILE", "FORMATS", "RunCurves", "read_curves", "metric_names", "plot_runs"]

METRICS_FILE = "metrics.jsonl"
FORMATS = ("png", "svg", "pdf")
_NOT_METRICS = ("iter", "images")


@dataclass
class RunCurves:
    run_dir: Path
    train: list[dict[str, Any]] = field(default_factory=list)  # records with a "loss", in file order
    evals: list[dict[str, Any]] = field(default_factory=list)  # evaluation records (they name a "split")


def read_curves(run_dir: Path) -> RunCurves:
    """The training and evaluation records of a run directory's ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise SegpromptError(f"run directory '{run_dir}' does not exist; pass the folder `segprompt train` "
                             f"wrote (its --out, or results/<recipe>/<timestamp>)")
    if not path.is_file():
        raise SegpromptError(f"'{run_dir}' has no {METRICS_FILE}: it is not a run directory of `segprompt "
                             f"train`, or its run has not started; pass a run directory (results/<recipe>/<timestamp>)")
    curves = RunCurves(run_dir)
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if not isinstance(rec, dict) or not isinstance(rec.get("iter"), int):
            continue
        if rec.get("event") == "resume":  # what the interrupted process logged after the checkpoint is void
            curves.train = [r for r in curves.train if r["iter"] <= rec["iter"]]
            curves.evals = [r for r in curves.evals if r["iter"] <= rec["iter"]]
        elif "event" in rec:
            continue
        elif _number(rec.get("loss")):
            curves.train.append(rec)
        elif "split" in rec:
            curves.evals.append(rec)
    return curves


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_names(runs: list[RunCurves]) -> list[str]:
    """The evaluation metrics that at least one of ``runs`` recorded."""
    return sorted({k for run in runs for rec in run.evals for k, v in rec.items()
                   if k not in _NOT_METRICS and _number(v)})


def _labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, with parent folders added until the labels differ."""
    parts = [p.resolve().parts for p in run_dirs]
    depth = 1
    while len({p[-depth:] for p in parts}) < len(parts) and depth < max(map(len, parts)):
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


def _check_out(out: Path, force: bool) -> str:
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise SegpromptError(f"--out '{out}': the file name must end in {', '.join('.' + f for f in FORMATS)}")
    if out.is_dir():
        raise SegpromptError(f"--out '{out}' is a folder; give a file name such as {out / 'curves.png'}")
    if out.exists() and not force:
        raise SegpromptError(f"'{out}' already exists; choose another --out, or add --force to replace it")
    return fmt


def plot_runs(run_dirs: list[Path], out: Path, *, metric: str = "mIoU", force: bool = False) -> list[str]:
    """Draw the loss and ``metric`` curves of ``run_dirs`` into ``out`` (.png, .svg or .pdf).

    Returns notes on runs that have nothing to draw in a panel yet. Raises :class:`SegpromptError`
    for a folder without ``metrics.jsonl``, a ``metric`` that no run recorded (naming those that
    exist), or an ``out`` that exists without ``force``."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise SegpromptError("give at least one run directory")
    seen: set[Path] = set()
    for d in run_dirs:
        if d.resolve() in seen:
            raise SegpromptError(f"run directory '{d}' is given twice")
        seen.add(d.resolve())
    out = Path(out)
    fmt = _check_out(out, force)
    runs = [read_curves(d) for d in run_dirs]
    available = metric_names(runs)
    if available and metric not in available:
        raise SegpromptError(f"--metric '{metric}' is not recorded by these runs; choose one of: {', '.join(available)}")
    notes = [f"'{r.run_dir}' has no training record yet" for r in runs if not r.train]
    notes += [f"'{r.run_dir}' has no {metric} evaluation yet" for r in runs
              if not any(_number(e.get(metric)) for e in r.evals)]
    atomic_write_bytes(out, _draw(runs, _labels(run_dirs), metric, fmt))
    return notes


def _draw(runs: list[RunCurves], labels: list[str], metric: str, fmt: str) -> bytes:
    # function-level imports: matplotlib loads in about a second, and only `plot` needs it; the
    # Figure + Agg canvas API draws without pyplot's global state or a display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.subplots(1, 2)
    splits = sorted({str(e["split"]) for r in runs for e in r.evals})
    for i, (run, label) in enumerate(zip(runs, labels)):
        colour = f"C{i % 10}"
        ax_loss.plot([r["iter"] for r in run.train], [r["loss"] for r in run.train], color=colour, label=label)
        points = [(e["iter"], e[metric]) for e in run.evals if _number(e.get(metric))]
        ax_metric.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colour, label=label)
    ax_loss.set_title("training loss", fontsize=10)
    ax_metric.set_title(f"{metric} ({', '.join(splits)})" if splits else f"{metric}: no evaluation yet", fontsize=10)
    for ax, ylabel in ((ax_loss, "loss"), (ax_metric, metric)):
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    return buf.getvalue()
