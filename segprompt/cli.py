"""`segprompt` command line: prepare, train and eval (typer + rich).

The CLI only parses arguments and prints; all work happens in :mod:`segprompt.engine` and
:mod:`segprompt.data`. User errors (:class:`SegpromptError`) print one clear message and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from segprompt.errors import SegpromptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient and text-guided semantic segmentation experiments.")
console = Console()
err_console = Console(stderr=True)

PREPARERS = ("synthetic",)


@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help=f"Dataset to prepare: {', '.join(PREPARERS)}.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the prepared layout to.")],
    seed: Annotated[int, typer.Option(help="synthetic: generator seed.")] = 0,
    num_classes: Annotated[int, typer.Option(help="synthetic: classes, background included (2..32).")] = 6,
    image_size: Annotated[int, typer.Option(help="synthetic: square image side in pixels.")] = 128,
    train: Annotated[int, typer.Option(help="synthetic: training images.")] = 64,
    val: Annotated[int, typer.Option(help="synthetic: validation images.")] = 16,
    test: Annotated[int, typer.Option(help="synthetic: test images.")] = 16,
    domain_shift: Annotated[float, typer.Option(help="synthetic: appearance shift in [0, 1] "
                                                     "(0 = source domain, 1 = fully shifted target).")] = 0.0,
    force: Annotated[bool, typer.Option(help="Redo it; an existing folder is moved aside, not deleted.")] = False,
) -> None:
    """Write a dataset in the prepared layout (img_dir/, ann_dir/, meta.json)."""
    if dataset not in PREPARERS:
        raise SegpromptError(f"unknown dataset '{dataset}'; `segprompt prepare` knows: {', '.join(PREPARERS)}")
    from segprompt.data.synthetic import generate_synthetic

    meta = generate_synthetic(out, seed=seed, num_classes=num_classes, image_size=(image_size, image_size),
                              counts={"train": train, "val": val, "test": test}, domain_shift=domain_shift,
                              force=force)
    console.print(f"[green]prepared[/] {meta.name} at {out}: "
                  + ", ".join(f"{k} {v}" for k, v in meta.splits.items()) + f"; {meta.num_classes} classes")


@app.command("train")
def train_cmd(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE (YAML scalar); repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default results/<recipe>/<timestamp>/).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="'auto' (latest run of the recipe, or --out) or a checkpoint/run path.")] = None,
    load_from: Annotated[Optional[Path], typer.Option(help="Initialise weights from a checkpoint; the iteration counter starts at 0.")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved recipe and exit.")] = False,
) -> None:
    """Train a recipe on one CPU, one GPU, or under torchrun (DDP)."""
    from segprompt.config import dump_recipe, load_recipe

    overrides = set_ or []
    if print_config:
        console.print(dump_recipe(load_recipe(recipe, overrides)), markup=False, highlight=False)
        return
    if resume and load_from:
        raise SegpromptError("--resume continues a run; --load-from starts a new one from weights: use one")
    from segprompt.engine.train import train

    train(recipe, overrides, out=out, resume=resume, load_from=load_from)


@app.command("eval")
def eval_cmd(
    target: Annotated[Path, typer.Argument(help="A run directory, or a recipe (then --checkpoint PATH).")],
    checkpoint: Annotated[str, typer.Option(help="best | last | PATH.")] = "best",
    mode: Annotated[Optional[str], typer.Option(help="whole | slide (default: the recipe's).")] = None,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Multi-scale + flip test-time augmentation.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to evaluate (default data.val_split).")] = None,
    save_preds: Annotated[Optional[Path], typer.Option(help="Write index PNGs and colour overlays here.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE; repeatable.")] = None,
) -> None:
    """Evaluate a checkpoint: aAcc, mIoU, mAcc, mDice, mFscore and a per-class table."""
    if mode is not None and mode not in ("whole", "slide"):
        raise SegpromptError(f"--mode '{mode}' is not one of: whole, slide")
    from segprompt.engine.evaluate import evaluate_checkpoint
    from segprompt.engine.metrics import format_table

    run_dir, result = evaluate_checkpoint(target, checkpoint=checkpoint, overrides=set_ or [], mode=mode, tta=tta,
                                          split=split, save_preds=save_preds)
    if _is_main():
        console.print(format_table(result))
        console.print(f"wrote {run_dir / 'eval.json'}")


@app.command("count-params")
def count_params_cmd(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe to break down; without one, every parameter "
                                                          "figure of the papers' tables beside ours.")] = None,
    table: Annotated[Optional[str], typer.Option(help="Only this table of the SPM paper (e.g. 4).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE; repeatable.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes (default: data.num_classes, else meta.json).")] = None,
    convention: Annotated[str, typer.Option(help="paper (no BatchNorm, as the SPM paper counts) | all.")] = "paper",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Parameter counts, built on the meta device (no data or weights needed).

    With RECIPE: its model by group (backbone, prompt, head): trainable, frozen, stored per task
    and % of full tuning. Without: the papers' parameter figures, ours beside theirs."""
    if recipe is None:
        _paper_counts(table, as_json)
        return
    import json

    from segprompt.config import load_recipe
    from segprompt.engine.params import CONVENTIONS, breakdown

    cfg = load_recipe(recipe, set_ or [])
    k = num_classes or cfg.data.num_classes
    if k is None:
        from segprompt.engine.build import dataset_meta

        k = dataset_meta(cfg).num_classes
    if convention not in CONVENTIONS:
        raise SegpromptError(f"--convention '{convention}' is not one of: {', '.join(CONVENTIONS)}")
    b = breakdown(cfg, k, convention)
    result = {"recipe": str(recipe), "num_classes": k, "convention": convention, "groups": b.groups,
              "trainable": b.trainable, "frozen": b.frozen, "stored_per_task": b.stored_per_task,
              "full_tuning": b.full_tuning, "percent_of_full": 100 * b.trainable / b.full_tuning}
    if as_json:
        console.print_json(json.dumps(result))
        return
    from rich.table import Table

    out = Table(title=f"{recipe} ({cfg.tuning['name']}, K={k}, convention: {convention})")
    for col in ("group", "total", "trainable", "frozen"):
        out.add_column(col, justify="left" if col == "group" else "right")
    for name, g in b.groups.items():
        out.add_row(name, f"{g['total']:,}", f"{g['trainable']:,}", f"{g['total'] - g['trainable']:,}")
    out.add_row("all", f"{b.trainable + b.frozen:,}", f"{b.trainable:,}", f"{b.frozen:,}", style="bold")
    console.print(out)
    console.print(f"trainable {b.trainable / 1e6:.2f}M = {result['percent_of_full']:.2f}% of full tuning "
                  f"({b.full_tuning / 1e6:.2f}M); stored per task: {b.stored_per_task:,} parameters "
                  f"(every trainable tensor, BatchNorm included)")


@app.command()
def demo(
    out: Annotated[Optional[Path], typer.Option(help="Where the runs and the report go "
                                                     "(default results/demo/<timestamp>/).")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated tuning methods to compare.")] = "head,bias,adapter,spm,full",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic domains.")] = 0,
) -> None:
    """The synthetic transfer demo: pre-train a small backbone on a source domain (cached), adapt it to a
    shifted target domain with each method, and compare trainable parameters, mIoU and time."""
    import time

    from rich.table import Table

    from segprompt.engine.demo import LABELS, METHODS, run_demo
    from segprompt.engine.rundir import new_run_dir

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise SegpromptError(f"--methods: {unknown} not among {', '.join(METHODS)}")
    out = new_run_dir(out or Path("results/demo") / time.strftime("%Y%m%d-%H%M%S"))
    rows = run_demo(out, chosen, seed=seed)
    table = Table(title="Synthetic source -> target transfer (6 classes, small ResNet-18 + FCN)")
    for col in ("method", "trainable params", "target mIoU", "wall time (s)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(LABELS.get(r.method, r.method), f"{r.trainable:,}", f"{r.mIoU:.2f}", f"{r.seconds:.1f}")
    console.print(table)
    console.print(f"report: {out / 'demo.csv'}, {out / 'demo.md'}, {out / 'demo.png'}")


def _paper_counts(table: str | None, as_json: bool) -> None:
    import dataclasses
    import json

    from segprompt.engine.params import paper_counts
    from segprompt.tables import all_tables

    tables = [t for t in all_tables() if table is None or (t.paper == "spm" and t.table == table)]
    if not tables:
        raise SegpromptError(f"--table {table}: the SPM paper has no table {table} with parameter figures")
    rows = paper_counts(tables)
    if as_json:
        console.print_json(json.dumps([dataclasses.asdict(r) for r in rows]))
        return
    from rich.table import Table

    out = Table(title="Parameter figures (M): ours beside the paper's, SPM paper counting convention")
    for col in ("table", "row", "column", "ours", "paper", "match"):
        out.add_column(col, justify="right" if col in ("ours", "paper") else "left")
    for r in rows:
        out.add_row(f"{r.paper} {r.table}", r.row, r.column, f"{r.ours:.2f}", f"{r.paper_value:.2f}",
                    "[green]match[/]" if r.match else f"[yellow]{r.reason}[/]")
    console.print(out)
    console.print(f"{sum(r.match for r in rows)} of {len(rows)} figures match")


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _user_message(e: SegpromptError) -> str:
    # DataLoader workers re-raise with the worker's traceback in the text: keep the message.
    text = str(e)
    marker = "SegpromptError: "
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text


def main() -> None:
    try:
        app()
    except SegpromptError as e:
        err_console.print(f"[bold red]error:[/] {_user_message(e)}", markup=True, highlight=False)
        sys.exit(2)
