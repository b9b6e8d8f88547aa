"""``segprompt prepare``: the synthetic dataset, or the official archives of a real one, in the
prepared layout (``docs/datasets.md``)."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from segprompt.cli.app import app, console
from segprompt.data.prepare import DATASETS
from segprompt.errors import SegpromptError
from segprompt.progress import progress_bar  # rich only: keeps the CLI's start light

PREPARERS = ("synthetic", *DATASETS)


@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help=f"Dataset to prepare: {', '.join(PREPARERS)}.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the prepared layout to (with --check: to verify).")],
    src: Annotated[Optional[list[Path]], typer.Option("--src", help="Real datasets: the folder holding the official "
                                                      "archives, an archive, or an extracted copy; repeatable.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Re-verify the prepared folder --out: files listed, "
                                                        "counts, sizes, label values, class prior.")] = False,
    nproc: Annotated[Optional[int], typer.Option(help="Real datasets: worker processes (default: the cores, "
                                                      "at most 8).")] = None,
    expect_counts: Annotated[Optional[str], typer.Option(help="Real datasets: per-split counts to insist on instead "
                                                              "of the official ones, e.g. train=3,val=2 (to convert "
                                                              "a subset on purpose).")] = None,
    layout: Annotated[Optional[str], typer.Option(help="camvid: rgb720 (960x720 colour labels; default) | "
                                                       "segnet360 (480x360 index labels).")] = None,
    tiling: Annotated[Optional[str], typer.Option(help="vaihingen: mmseg (default; 344/398 tiles) | true-stride "
                                                       "(1046/1208).")] = None,
    tile_size: Annotated[Optional[int], typer.Option(help="vaihingen: tile side in pixels (default 512).")] = None,
    tile_stride: Annotated[Optional[int], typer.Option(help="vaihingen: tiling stride (default 256).")] = None,
    annotator: Annotated[Optional[str], typer.Option(help="chase_db1: 1stHO (default) | 2ndHO; stare: ah (default) "
                                                          "| vk.")] = None,
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
    """Write a dataset in the prepared layout (img_dir/, ann_dir/, meta.json), or --check one.

    Real datasets are converted from the official archives you downloaded (never downloaded here);
    see data_scripts/ for where each is published and the exact command."""
    from segprompt.data.meta import META_FILE

    if dataset not in PREPARERS:
        raise SegpromptError(f"unknown dataset '{dataset}'; `segprompt prepare` knows: {', '.join(PREPARERS)}")
    workers = nproc if nproc is not None else min(os.cpu_count() or 1, 8)
    if workers < 1:
        raise SegpromptError(f"--nproc must be at least 1, got {workers}")

    if check:
        _check(dataset, out, workers)
        return
    meta_before = _file_id(out / META_FILE)  # written last; unchanged after the run = nothing was done
    real = {"--src": src, "--expect-counts": expect_counts, "--layout": layout, "--tiling": tiling,
            "--tile-size": tile_size, "--tile-stride": tile_stride, "--annotator": annotator}
    if dataset == "synthetic":
        given = [k for k, v in real.items() if v]
        if given:
            raise SegpromptError(f"{', '.join(given)} do(es) not apply to synthetic (it is generated, not converted)")
        from segprompt.data.synthetic import generate_synthetic

        meta = generate_synthetic(out, seed=seed, num_classes=num_classes, image_size=(image_size, image_size),
                                  counts={"train": train, "val": val, "test": test}, domain_shift=domain_shift,
                                  force=force)
    else:
        from segprompt.data.prepare import parse_counts
        from segprompt.data.prepare import prepare as prepare_real

        with ExitStack() as stack:
            meta = prepare_real(dataset, src or [], out, expect_counts=parse_counts(expect_counts), nproc=workers,
                                force=force, progress=_stage_bars(stack),
                                log=lambda m: console.print(m, markup=False, highlight=False),
                                layout=layout, tiling=tiling, tile_size=tile_size, tile_stride=tile_stride,
                                annotator=annotator)
    same = meta_before is not None and meta_before == _file_id(out / META_FILE)
    console.print(f"[green]{'already prepared' if same else 'prepared'}[/] {meta.name} at {out}: "
                  + ", ".join(f"{k} {v}" for k, v in meta.splits.items()) + f"; {meta.num_classes} classes"
                  + ("; same options and sources, nothing written" if same else ""))


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_ino, st.st_mtime_ns


def _stage_bars(stack: ExitStack):
    """A progress callback with one bar per stage (hashing, converting, verifying, class prior);
    the bars start on the first report, so an early error prints alone."""
    tasks: dict[str, int] = {}
    bars = []

    def update(stage: str, done: int, total: int) -> None:
        if not bars:
            bars.append(stack.enter_context(progress_bar()))
        if stage not in tasks:
            tasks[stage] = bars[0].add_task(stage, total=total, info="")
        bars[0].update(tasks[stage], completed=done, total=total)
    return update


def _check(dataset: str, out: Path, workers: int) -> None:
    from segprompt.data.prepare.check import check as check_prepared

    with ExitStack() as stack:
        meta = check_prepared(dataset, out, nproc=workers, progress=_stage_bars(stack))
    console.print(f"[green]ok[/] {meta.name} at {out}: "
                  + ", ".join(f"{k} {v}" for k, v in meta.splits.items()) + f"; {meta.num_classes} classes; "
                  "every file decodes, sizes agree, label values and counts as recorded")

