"""Paper reproduction: ``ablate`` (a table as a grid of runs) and ``demo`` (the SPM miniature)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from segprompt.cli.app import EXAMPLES, app, console, err_console
from segprompt.errors import SegpromptError


@app.command(epilog=EXAMPLES["demo"])
def demo(
    out: Annotated[Optional[Path], typer.Option(help="Where the runs and the report go "
                                                     "(default results/demo/<timestamp>/).")] = None,
    backbone: Annotated[str, typer.Option(help="resnet (the default, ~8 min on 2 CPU cores), vit (adds VPT and "
                                               "AdaptFormer; ~30 min) or efficientnet_lite0 (real ImageNet "
                                               "features, the imagenet extra; 1-2 hours on 2 CPU cores).")] = "resnet",
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated tuning methods (head and full are needed; "
                                                        "default: all of the backbone's).")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Seeds per method (default: the scale's, 3 for quick).")] = None,
    iters: Annotated[Optional[int], typer.Option(help="Adaptation iterations per run (default: the scale's, 300 for "
                                                      "quick, 1000 for imagenet).")] = None,
    scale: Annotated[Optional[str], typer.Option(help="quick (~6 min on 2 CPU cores), full (longer, larger; a GPU) or "
                                                      "imagenet (efficientnet_lite0's; default: the backbone's).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Runs in parallel (default: min(2, CPU cores)).")] = None,
    controls: Annotated[bool, typer.Option(help="Also tune one backbone stage at a time (where the gap lives).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic domains.")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE in every adaptation "
                                                                    "run, e.g. model.backbone.output_stride=8; "
                                                                    "repeatable.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the demo in --out: finished runs are read back, an "
                                              "unfinished one continues from its last checkpoint.")] = False,
) -> None:
    """A fair miniature of the SPM paper's claim, with a computed verdict (docs/demo.md).

    Pre-train a small network on a synthetic source (cached), adapt it to a shifted target with
    each method (equal lr sweep chosen on target val, several seeds, target-test mIoU), report the
    gap recovered and a verdict computed from the table."""
    import time

    from rich.table import Table

    from segprompt.experiments.demo import SCALES, check_methods, run_demo
    from segprompt.experiments.demo_report import (
        edge_note,
        rows_from_report,
        source_line,
        table_lines,
    )
    from segprompt.runs.rundir import new_run_dir

    if scale is not None and scale not in SCALES:
        raise SegpromptError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
    chosen = check_methods(backbone, None if methods is None else [m.strip() for m in methods.split(",") if m.strip()])
    if resume:
        if out is None or not (out / "runs").is_dir():
            where = "no --out is given" if out is None else f"'{out}' holds no demo (no runs/ folder)"
            raise SegpromptError(f"--resume continues a demo in --out, but {where}; give the --out of the "
                                 f"interrupted demo, with the options it ran with")
    else:
        out = new_run_dir(out or Path("results/demo") / time.strftime("%Y%m%d-%H%M%S"))
    report = run_demo(out, chosen, backbone=backbone, scale=scale, seeds=seeds, iters=iters, seed=seed, workers=workers,
                      controls=controls, adapt_overrides=set_ or [],
                      progress=lambda msg: err_console.print(msg, highlight=False))
    cols, lines = table_lines(report, rows_from_report(report))
    sc = report["scale"]
    table = Table(title=f"segprompt demo ({backbone}, {report['scale_name']}): {report['source']} source -> target "
                        f"transfer, {sc['classes']} classes, "
                        f"target-test mIoU over {sc['seeds']} seed(s)")
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for line in lines:
        table.add_row(*line)
    console.print(source_line(report))
    console.print(table)
    for name, diag in {"spm": report["spm_diagnostics"], **report.get("spm_variant_diagnostics", {})}.items():
        slots = sorted({k.split("_")[0] for k in diag})
        if slots:
            console.print(f"{name} (seed 0) per slot: " + "; ".join(
                f"{s}: interim-map mIoU {diag.get(s + '_interim_mIoU', float('nan')):.1f}, "
                f"prompt size {diag.get(s + '_prompt_ratio', float('nan')):.3f}" for s in slots))
    console.print(f"verdict: {report['verdict']}")
    if report["edge_of_grid"]:
        console.print(edge_note(report))
    console.print(f"report: {out / 'demo.md'}, {out / 'demo.csv'}, {out / 'demo.json'}, {out / 'demo.png'} "
                  f"({report['seconds']:.0f} s)")


@app.command(epilog=EXAMPLES["ablate"])
def ablate(
    table: Annotated[Optional[str], typer.Option(help="Table N of the paper (e.g. 4).")] = None,
    figure: Annotated[Optional[str], typer.Option(help="Figure N of the paper (e.g. 5).")] = None,
    paper: Annotated[str, typer.Option(help="spm | stdc.")] = "spm",
    list_: Annotated[bool, typer.Option("--list", help="List every table and figure of both papers.")] = False,
    plan: Annotated[bool, typer.Option("--plan", help="Print the runs, their state and exact commands; run nothing.")] = False,
    collect: Annotated[bool, typer.Option("--collect", help="Only read the run directories and print/export the table.")] = False,
    scale: Annotated[str, typer.Option(help="full | smoke (synthetic data, tiny schedules, minutes on a CPU).")] = "full",
    rows: Annotated[Optional[str], typer.Option(help="Comma-separated row names to keep, e.g. '1,1-2'.")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Keep the first N seeds of each cell.")] = None,
    launcher: Annotated[str, typer.Option(help="local (one by one in this process) | torchrun | slurm (submitit).")] = "local",
    gpus: Annotated[int, typer.Option(help="torchrun: processes per run; slurm: GPUs (= tasks) per node.")] = 1,
    nodes: Annotated[int, typer.Option(help="slurm: nodes per run.")] = 1,
    partition: Annotated[Optional[str], typer.Option(help="slurm: partition.")] = None,
    time_min: Annotated[int, typer.Option("--time", help="slurm: time limit per job in minutes (requeued and resumed on time-out).")] = 24 * 60,
    wait: Annotated[bool, typer.Option("--wait", help="slurm: wait for the jobs, then collect.")] = False,
    results: Annotated[Path, typer.Option(help="Where the run directories go.")] = Path("results/ablate"),
    out: Annotated[Path, typer.Option(help="Where CSV, Markdown, LaTeX and plots go.")] = Path("results/tables"),
    data: Annotated[Path, typer.Option(help="smoke: where the synthetic stand-in datasets go.")] = Path("data"),
    verbose: Annotated[bool, typer.Option(help="local: show each run's training output (default: in _logs/).")] = False,
) -> None:
    """Reproduce a paper's table: run its missing cells, then collect ours beside the paper's.

    --plan only prints the runs, --collect only reads them; interrupted runs are resumed."""
    from segprompt.experiments import ablate as ab

    if list_:
        _list_tables()
        return
    if plan and collect:
        raise SegpromptError("give --plan or --collect, not both (neither: run the missing runs, then collect)")
    chosen_rows = [r.strip() for r in rows.split(",") if r.strip()] if rows else None
    failures = []
    for t in ab.select_tables(paper, table, figure):
        p = ab.build_plan(t, scale=scale, root=results, rows=chosen_rows, seeds=seeds, data_root=data)
        if plan:
            listing, commands = ab.render_plan(p, launcher, gpus)
            console.print(listing)
            for c in commands:
                console.print(c, markup=False, highlight=False, soft_wrap=True)
            continue
        if not collect:
            report = ab.run_plan(p, launcher=launcher, gpus=gpus, nodes=nodes, partition=partition, time_min=time_min,
                                 wait=wait, echo=lambda m: console.print(m, markup=False, highlight=False),
                                 quiet=not verbose)
            console.print(f"{t.id}: {len(report.launched)} run(s) finished now, {len(report.skipped)} already done, "
                          f"{len(report.submitted)} submitted, {len(report.failed)} failed, {len(report.waiting)} waiting")
            for r, why in report.waiting:
                console.print(f"  waiting: {r.label}: {why}", markup=False)
            failures += [f"{t.id} {r.label}: {msg} (log: {ab.log_path(p, r)})"
                         for r, msg in report.failed]
        result = ab.collect(p)
        console.print(ab.render(result))
        console.print("wrote " + ", ".join(str(x) for x in ab.export(result, out)))
    if failures:
        raise SegpromptError(f"{len(failures)} run(s) failed: " + "; ".join(failures))


def _list_tables() -> None:
    from rich.table import Table

    from segprompt.config import shipped_name
    from segprompt.experiments.tables import all_tables

    out = Table(title="Tables and figures of both papers (recipes/tables/); select with --paper P --table N / --figure N")
    for col in ("paper", "kind", "N", "title", "rows x cols", "recipes"):
        out.add_column(col)
    for t in all_tables():
        recipes = {str(t.cell(r, c)[0]) for r in t.rows for c in t.columns if c.kind in ("metric", "bench", "params")
                   and (c.recipe or r.recipe) and c.name not in r.skip}
        missing = sorted(shipped_name(p) or p for p in recipes if not Path(p).is_file())
        out.add_row(t.paper, t.kind, t.table, t.title, f"{len(t.rows)} x {len(t.columns)}",
                    f"[red]{len(missing)} of {len(recipes)} missing[/]" if missing else f"{len(recipes)} present")
    console.print(out)


@app.command(epilog=EXAMPLES["plot"])
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN", help="Run directories (each with its metrics.jsonl); one line "
                                                        "per run. --confusion: one run, or its eval json.")],
    out: Annotated[Path, typer.Option(help="Figure to write: FILE.png (or .svg, .pdf).")],
    metric: Annotated[str, typer.Option(help="Evaluation metric of the right panel (mIoU, aAcc, mAcc, mDice, "
                                             "...).")] = "mIoU",
    force: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    confusion: Annotated[bool, typer.Option("--confusion", help="Instead: the row-normalised confusion matrix of "
                                                               "one run's eval.json, with class names.")] = False,
    split: Annotated[Optional[str], typer.Option(help="--confusion: the evaluation of this split "
                                                      "(eval_<split>.json; default: eval.json).")] = None,
) -> None:
    """Training-loss and metric curves of one or several runs from their metrics.jsonl, or a run's
    confusion matrix (docs/watch.md)."""
    from segprompt.experiments.plot import plot_confusion, plot_runs

    if confusion:
        if len(run_dirs) != 1:
            raise SegpromptError(f"--confusion draws one run's matrix; got {len(run_dirs)} runs")
        read = plot_confusion(run_dirs[0], out, split=split, force=force)
        console.print(f"wrote {out} (from {read})", markup=False, highlight=False)
        return
    if split is not None:
        raise SegpromptError("--split picks the evaluation --confusion draws; the curves show every split recorded")
    for note in plot_runs(run_dirs, out, metric=metric, force=force):
        err_console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"wrote {out}", markup=False, highlight=False)
