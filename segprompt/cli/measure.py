"""What a model costs: ``count-params`` (and the papers' figures beside ours) and ``bench``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
import typer.core

from segprompt.cli.app import EXAMPLES, app, complete_recipe, console, err_console
from segprompt.errors import SegpromptError

if TYPE_CHECKING:
    from segprompt.measure.params import Breakdown


@app.command("count-params", epilog=EXAMPLES["count-params"])
def count_params_cmd(
    recipe: Annotated[Optional[Path], typer.Argument(metavar="RECIPE", help="Recipe to break down; without one, every parameter "
                                                          "figure of the papers' tables beside ours.",
                                                     autocompletion=complete_recipe)] = None,
    table: Annotated[Optional[str], typer.Option(help="Only this table of the SPM paper (e.g. 4).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE; repeatable.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes (default: data.num_classes, else meta.json).")] = None,
    convention: Annotated[str, typer.Option(help="paper (no BatchNorm, as the SPM paper counts) | all.")] = "paper",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Parameter counts, built on the meta device (no data or weights needed).

    With RECIPE: its model by group (backbone, prompt, head): trainable, frozen, stored per task
    and % of full tuning (every parameter counted), and a warning when the inserted modules outnumber
    full tuning's parameters. Without: the papers' parameter figures, ours beside theirs."""
    if recipe is None:
        _paper_counts(table, as_json)
        return
    import json

    from segprompt.config import load_recipe
    from segprompt.measure.params import CONVENTIONS, breakdown

    cfg = load_recipe(recipe, set_ or [])
    k = num_classes or cfg.data.num_classes
    if k is None:
        from segprompt.build import dataset_meta

        k = dataset_meta(cfg).num_classes
    if convention not in CONVENTIONS:
        raise SegpromptError(f"--convention '{convention}' is not one of: {', '.join(CONVENTIONS)}")
    b = breakdown(cfg, k, convention)
    # "% of full" counts every parameter whatever --convention is (docs/measurement.md, "% of full")
    result = {"recipe": str(recipe), "num_classes": k, "convention": convention, "groups": b.groups,
              "trainable": b.trainable, "frozen": b.frozen, "stored_per_task": b.stored_per_task,
              "full_tuning": b.full_tuning, "percent_of_full": b.percent_of_full,
              "percent_of_full_counts": {"trainable": b.share.trainable, "full_tuning": b.share.full,
                                         "inserted": b.share.inserted}, "warnings": b.warnings}
    if as_json:
        console.print_json(json.dumps(result))
    else:
        _breakdown_table(str(recipe), cfg.tuning["name"], k, b)
    for warning in b.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def _breakdown_table(recipe: str, method: str, k: int, b: Breakdown) -> None:
    from rich.table import Table

    out = Table(title=f"{recipe} ({method}, K={k}, convention: {b.convention})")
    for col in ("group", "total", "trainable", "frozen"):
        out.add_column(col, justify="left" if col == "group" else "right")
    for name, g in b.groups.items():
        out.add_row(name, f"{g['total']:,}", f"{g['trainable']:,}", f"{g['total'] - g['trainable']:,}")
    out.add_row("all", f"{b.trainable + b.frozen:,}", f"{b.trainable:,}", f"{b.frozen:,}", style="bold")
    console.print(out)
    # share.trainable is stored_per_task: both count every trainable parameter
    console.print(f"trainable {b.share.trainable:,} parameters (stored per task) = {b.percent_of_full:.2f}% of "
                  f"full tuning's {b.share.full:,} (every parameter counted, BatchNorm included; "
                  f"docs/measurement.md)", highlight=False)


def _paper_counts(table: str | None, as_json: bool) -> None:
    import dataclasses
    import json

    from segprompt.experiments.paper_counts import paper_counts
    from segprompt.experiments.tables import all_tables

    tables = [t for t in all_tables() if table is None or (t.paper == "spm" and t.table == table)]
    if not tables:
        raise SegpromptError(f"--table {table}: the SPM paper has no table {table} with parameter figures")
    rows = paper_counts(tables, costs=True)
    if as_json:
        console.print_json(json.dumps([dataclasses.asdict(r) for r in rows]))
        return
    from rich.table import Table

    out = Table(title="Parameter (M) and FLOPs (G) figures: ours beside the paper's (SPM: its counting "
                      "convention; STDC: every parameter and MMCV FLOPs of the deployed model)")
    for col in ("table", "row", "column", "ours", "paper", "match"):
        out.add_column(col, justify="right" if col in ("ours", "paper") else "left")
    for r in rows:
        out.add_row(f"{r.paper} {r.table}", r.row, r.column, f"{r.ours:.2f}", f"{r.paper_value:.2f}",
                    "[green]match[/]" if r.match else f"[yellow]{r.reason}[/]")
    console.print(out)
    console.print(f"{sum(r.match for r in rows)} of {len(rows)} figures match")


@app.command(epilog=EXAMPLES["bench"])
def bench(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE|RUN|ONNX", help="A recipe, a run directory (its config.yaml; bench.json is "
                                                "written into it, an earlier one moved to bench_history/), or an "
                                                ".onnx file from `segprompt export` (timed with onnxruntime).")],
    vs: Annotated[Optional[Path], typer.Option(help="A second recipe, run directory or .onnx file, timed "
                                                    "alternately with RECIPE; reports fps(RECIPE) / fps(VS).")] = None,
    size: Annotated[Optional[str], typer.Option(help="HxW (default 512x1024 for cityscapes, 720x960 for camvid, "
                                                     "else data.test.scale).")] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16 (model and input cast to it).")] = "fp32",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="channels-last memory format.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model (compiled during the "
                                                             "warm-up).")] = False,
    compile_mode: Annotated[str, typer.Option(help="torch.compile mode: default | reduce-overhead (CUDA graphs "
                                                   "on a GPU) | max-autotune; implies --compile.")] = "default",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    warmup: Annotated[int, typer.Option(help="Warm-up runs.")] = 10,
    calib_iters: Annotated[int, typer.Option(help="Calibration starts at N iterations, doubled until one pass "
                                                  "takes --calib-seconds.")] = 1,
    calib_seconds: Annotated[float, typer.Option(help="Calibration pass length to reach.")] = 1.0,
    seconds: Annotated[float, typer.Option(help="Timed loop length (per model).")] = 3.0,
    chunks: Annotated[int, typer.Option(help="Timed chunks per model (latency std is over them; --vs "
                                             "alternates them).")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads and onnxruntime intra-op threads "
                                                        "(default: each library's).")] = None,
    provider: Annotated[Optional[str], typer.Option(help=".onnx files: onnxruntime's cpu | cuda | tensorrt "
                                                         "(default: after --device).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE (both models); "
                                                                    "repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON result.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Also write the JSON result to this file.")] = None,
    force: Annotated[bool, typer.Option(help="Let --out overwrite an existing file.")] = False,
) -> None:
    """Parameters, FLOPs and inference speed (FPS) of a recipe, a run or an exported .onnx file.

    Batch 1, random weights, text prompts deployed, as the CLIP-distilled STDC-Seg paper measures
    FPS; an .onnx file is timed with onnxruntime."""
    import json

    from segprompt.io import atomic_write_json
    from segprompt.measure.bench import (
        BenchOptions,
        check_out,
        comparison_lines,
        format_table,
        parse_size,
        run_bench,
        save_run_bench,
    )

    check_out(out, force)
    opts = BenchOptions(size=parse_size(size) if size else None, dtype=dtype, channels_last=channels_last,
                        compile=compile_ or compile_mode != "default", compile_mode=compile_mode, device=device,
                        warmup=warmup, calib_iters=calib_iters, calib_seconds=calib_seconds, seconds=seconds,
                        chunks=chunks, threads=threads, provider=provider)
    result = run_bench(recipe, opts, set_ or [], vs=vs)
    written = []
    if recipe.is_dir():
        written.append(save_run_bench(recipe, result))
    if out is not None:
        atomic_write_json(out, result)
        written.append(out)
    if as_json:
        console.print_json(json.dumps(result))
    else:
        console.print(format_table(result))
        for line in comparison_lines(result):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    for path in written:
        err_console.print(f"wrote {path}", highlight=False)
