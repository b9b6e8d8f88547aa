"""``segprompt plot``: training-loss and metric curves of one or several runs, from ``metrics.jsonl``.

One figure with two panels against the iteration: the training ``loss`` (the records written every
``runtime.log_interval``) and one evaluation metric (``mIoU`` by default); one line per run, the same
colour in both panels, labelled by the run directory's name (with as many parent folders as make the
labels differ). A resumed run's ``metrics.jsonl`` holds a ``resume`` event: the records the
interrupted process wrote after that checkpoint are dropped there, so every iteration is drawn once
(docs/watch.md). Matplotlib draws on its Agg canvas (no display needed); the file is written
atomically and an existing one is replaced only with ``force``.

``segprompt plot RUN --confusion`` draws the other figure: the confusion matrix an evaluation stored in
``eval.json`` (``eval_<split>.json`` with ``--split``), each row (a ground-truth class) divided by its
pixel count, so the diagonal is each class's recall (Acc), with the class names on both axes.
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
from segprompt.runs.rundir import failed_start

__all__ = ["METRICS_FILE", "FORMATS", "RunCurves", "read_curves", "metric_names", "plot_runs", "plot_confusion"]

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
    # the remains of a start refused before its first iteration (older segprompt versions left them)
    # have nothing to draw: passed over without a word, as `ablate` does
    kept = [d for d in run_dirs if not (d.is_dir() and (d / "config.yaml").is_file() and failed_start(d))]
    if not kept:
        raise SegpromptError(f"nothing to plot: {', '.join(map(str, run_dirs))} ended before their first iteration")
    run_dirs = kept
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


def plot_confusion(target: Path, out: Path, *, split: str | None = None, force: bool = False) -> Path:
    """Draw the row-normalised confusion matrix of ``target`` (a run directory, or an eval json file)
    into ``out``; returns the eval json read."""
    target, out = Path(target), Path(out)
    fmt = _check_out(out, force)
    path = target
    if target.is_dir():  # eval.json holds the validation split, eval_<split>.json any other (docs/runs.md)
        path = target / ("eval.json" if split is None else f"eval_{split}.json")
        if split is not None and not path.is_file() and (target / "eval.json").is_file():
            if json.loads((target / "eval.json").read_text()).get("split") == split:
                path = target / "eval.json"
    if not path.is_file():
        raise SegpromptError(f"'{path}' does not exist: evaluate first (`segprompt eval {target}"
                             + (f" --split {split}`" if split else "`") + "), then plot its confusion matrix")
    try:
        result = json.loads(path.read_text())
        counts = [[float(v) for v in row] for row in result["confusion_matrix"]]
        names = [str(c["class"]) for c in result["per_class"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SegpromptError(f"'{path}' is not an eval.json with a confusion matrix and per-class names "
                             f"({type(e).__name__}: {e}); re-run `segprompt eval`") from None
    if len(counts) != len(names) or any(len(row) != len(names) for row in counts):
        raise SegpromptError(f"'{path}': the confusion matrix is not {len(names)} x {len(names)} (one row and "
                             f"column per class)")
    title = (f"{target.name if target.is_dir() else path.parent.name}: {result.get('split', 'val')} split, "
             f"iteration {result.get('iter')}, mIoU {result.get('mIoU', float('nan')):.2f}")
    atomic_write_bytes(out, _draw_confusion(counts, names, title, fmt))
    return path


def _draw_confusion(counts: list[list[float]], names: list[str], title: str, fmt: str) -> bytes:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mat = np.asarray(counts, dtype=np.float64)
    totals = mat.sum(1, keepdims=True)
    norm = np.divide(mat, totals, out=np.zeros_like(mat), where=totals > 0)
    k = len(names)
    side = min(max(4.5, 0.32 * k + 2.5), 40)
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the row's pixels")
    small = max(4, min(9, 200 // max(k, 1)))
    ax.set_xticks(range(k), names, rotation=90, fontsize=small)
    ax.set_yticks(range(k), [f"{n} ({int(t)})" if k <= 40 else n for n, t in zip(names, totals[:, 0])],
                  fontsize=small)
    if k <= 30:  # a number in every cell stays legible up to about 30 classes
        for i in range(k):
            for j in range(k):
                if totals[i, 0] > 0:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=small - 1,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class (pixels)" if k <= 40 else "ground-truth class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    return buf.getvalue()
