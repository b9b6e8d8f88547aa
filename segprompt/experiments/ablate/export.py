"""Showing a plan and a collected table: the console listing, and CSV, Markdown, LaTeX and PNG files
under ``TABLES_OUT``."""

from __future__ import annotations

import io
import math
import shlex
from pathlib import Path
from typing import Any

from rich.table import Table as RichTable

from segprompt.experiments.ablate.collect import CellValue, Collected, parse_paper
from segprompt.experiments.ablate.launch import command
from segprompt.experiments.ablate.plan import Plan, missing_inputs, remaining_work
from segprompt.experiments.ablate.smoke import SMOKE_BANNER
from segprompt.io import atomic_write_bytes, atomic_write_text

TABLES_OUT = Path("results/tables")


MISSING = "—"


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
    import pandas as pd  # here, not at the top: only exports need pandas, which takes a second to load

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
    import matplotlib  # here, not at the top: only plots need it (slow to load)

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
    runs, iters, images = remaining_work(plan)
    needs = missing_inputs(plan)
    summary = [f"# to do: {runs} run(s), {iters:,} training iterations in all ({images:,} images read)"
               + ("" if runs else ": nothing, every run is done")]
    summary += [f"# missing: {line}" for line in needs] or (["# inputs: every dataset and weights file the "
                                                           "runs need is in place"] if runs else [])
    return out, summary + commands
