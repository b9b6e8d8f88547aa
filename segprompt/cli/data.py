"""``segprompt prepare``: the synthetic dataset, or the official archives of a real one, in the
prepared layout (``docs/datasets.md``)."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from segprompt.cli.app import EXAMPLES, app, complete_recipe, console
from segprompt.data.prepare import DATASETS
from segprompt.errors import SegpromptError
from segprompt.progress import progress_bar  # rich only: keeps the CLI's start light

PREPARERS = ("synthetic", "folder", *DATASETS)
FOLDER_USAGE = ("`segprompt prepare folder --images DIR --masks DIR --classes a,b,... --val-fraction 0.2 "
                "--out DIR` (README, \"Train on your own data\")")


# the real datasets' options, declared here to keep the signature short
R_NPROC = Annotated[Optional[int], typer.Option(help="Real datasets: worker processes (default: the cores, "
                                                  "at most 8).")]
R_EXPECT_COUNTS = Annotated[Optional[str], typer.Option(help="Real datasets: per-split counts to insist on instead "
                                                          "of the official ones, e.g. train=3,val=2 (to convert "
                                                          "a subset on purpose).")]
R_LAYOUT = Annotated[Optional[str], typer.Option(help="camvid: rgb720 (960x720 colour labels; default) | "
                                                   "segnet360 (480x360 index labels).")]
R_TILING = Annotated[Optional[str], typer.Option(help="vaihingen: mmseg (default; 344/398 tiles) | true-stride "
                                                   "(1046/1208).")]
R_ANNOTATOR = Annotated[Optional[str], typer.Option(help="chase_db1: 1stHO (default) | 2ndHO; stare: ah (default) "
                                                      "| vk.")]

# `prepare folder`'s options (your own images and masks), declared here to keep the signature short
F_IMAGES = Annotated[Optional[Path], typer.Option(help="folder: your images (flat, or in train/, val/... "
                                                     "sub-folders).")]
F_MASKS = Annotated[Optional[Path], typer.Option(help="folder: your masks, paired with the images by file "
                                                    "stem, in the same sub-folders.")]
F_CLASSES = Annotated[Optional[str], typer.Option(help="folder: class names in label order, e.g. "
                                                    "background,road,building.")]
F_CLASSES_FILE = Annotated[Optional[Path], typer.Option(help="folder: a file with one class per line, "
                                                          "optionally 'name R G B'.")]
F_PALETTE = Annotated[Optional[str], typer.Option(help="folder: one R,G,B per class, ';'-separated "
                                                    "(display colours; the key of --mask-format rgb).")]
F_MASK_FORMAT = Annotated[str, typer.Option(help="folder: index (values 0..K-1, or a palette PNG) | rgb "
                                              "(colours mapped through the palette).")]
F_MASK_SUFFIX = Annotated[str, typer.Option(help="folder: what a mask's stem adds to its image's, e.g. "
                                              "_mask.")]
F_IGNORE_INDEX = Annotated[int, typer.Option(help="folder: the mask value meaning 'unlabelled' "
                                               "(-1: none).")]
F_REDUCE_ZERO_LABEL = Annotated[bool, typer.Option(help="folder: masks use 0 for 'unlabelled' and "
                                                     "1..K for the classes.")]
F_VAL_FRACTION = Annotated[Optional[float], typer.Option(help="folder: hold out this fraction of a flat "
                                                           "folder as val (seeded by --seed).")]


@app.command(epilog=EXAMPLES["prepare"])
def prepare(
    dataset: Annotated[str, typer.Argument(metavar="DATASET", help=f"Dataset to prepare: {', '.join(PREPARERS)}.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the prepared layout to (with --check: to verify).")],
    src: Annotated[Optional[list[Path]], typer.Option("--src", help="Real datasets: the folder holding the official "
                                                      "archives, an archive, or an extracted copy; repeatable.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Re-verify the prepared folder --out: files listed, "
                                                        "counts, sizes, label values, class prior.")] = False,
    nproc: R_NPROC = None,
    expect_counts: R_EXPECT_COUNTS = None,
    layout: R_LAYOUT = None,
    tiling: R_TILING = None,
    tile_size: Annotated[Optional[int], typer.Option(help="vaihingen: tile side in pixels (default 512).")] = None,
    tile_stride: Annotated[Optional[int], typer.Option(help="vaihingen: tiling stride (default 256).")] = None,
    annotator: R_ANNOTATOR = None,
    images: F_IMAGES = None,
    masks: F_MASKS = None,
    classes: F_CLASSES = None,
    classes_file: F_CLASSES_FILE = None,
    palette: F_PALETTE = None,
    mask_format: F_MASK_FORMAT = "index",
    mask_suffix: F_MASK_SUFFIX = "",
    ignore_index: F_IGNORE_INDEX = 255,
    reduce_zero_label: F_REDUCE_ZERO_LABEL = False,
    val_fraction: F_VAL_FRACTION = None,
    seed: Annotated[int, typer.Option(help="synthetic: generator seed; folder: the --val-fraction "
                                           "split's seed.")] = 0,
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

    Real datasets come from the official archives you downloaded (data_scripts/ says where); your own
    images and masks: `folder` (README, "Train on your own data")."""
    from segprompt.data.meta import META_FILE

    if dataset not in PREPARERS:
        raise SegpromptError(f"unknown dataset '{dataset}'; `segprompt prepare` knows: {', '.join(PREPARERS)}. "
                             f"For your own images and masks: {FOLDER_USAGE}")
    workers = nproc if nproc is not None else min(os.cpu_count() or 1, 8)
    if workers < 1:
        raise SegpromptError(f"--nproc must be at least 1, got {workers}")

    if check:
        _check(dataset, out, workers)
        return
    meta_before = _file_id(out / META_FILE)  # written last; unchanged after the run = nothing was done
    real = {"--src": src, "--expect-counts": expect_counts, "--layout": layout, "--tiling": tiling,
            "--tile-size": tile_size, "--tile-stride": tile_stride, "--annotator": annotator}
    folder = {"--images": images, "--masks": masks, "--classes": classes, "--classes-file": classes_file,
              "--palette": palette, "--mask-format": mask_format != "index", "--mask-suffix": mask_suffix,
              "--ignore-index": ignore_index != 255, "--reduce-zero-label": reduce_zero_label,
              "--val-fraction": val_fraction is not None}
    _refuse_foreign(dataset, real, folder)
    if dataset == "folder":
        meta = _prepare_folder(images, masks, out, classes, classes_file, palette, mask_format, mask_suffix,
                               ignore_index, reduce_zero_label, val_fraction, seed, workers, force)
    elif dataset == "synthetic":
        from segprompt.data.synthetic import generate_synthetic

        meta = generate_synthetic(out, seed=seed, num_classes=num_classes, image_size=(image_size, image_size),
                                  counts={"train": train, "val": val, "test": test}, domain_shift=domain_shift,
                                  force=force)
    else:
        meta = _prepare_real(dataset, src, out, expect_counts, workers, force, layout=layout, tiling=tiling,
                             tile_size=tile_size, tile_stride=tile_stride, annotator=annotator)
    same = meta_before is not None and meta_before == _file_id(out / META_FILE)
    console.print(f"[green]{'already prepared' if same else 'prepared'}[/] {meta.name} at {out}: "
                  + ", ".join(f"{k} {v}" for k, v in meta.splits.items()) + f"; {meta.num_classes} classes"
                  + ("; same options and sources, nothing written" if same else ""))


def _refuse_foreign(dataset: str, real: dict, folder: dict) -> None:
    """Options given that belong to another kind of dataset are an error naming them."""
    if dataset != "folder" and any(folder.values()):
        raise SegpromptError(f"{', '.join(k for k, v in folder.items() if v)} appl(y/ies) to `prepare folder` "
                             f"(your own images and masks), not to {dataset}")
    given = [k for k, v in real.items() if v]
    if dataset == "folder" and given:
        raise SegpromptError(f"{', '.join(given)} do(es) not apply to folder: name your folders with "
                             f"--images and --masks")
    if dataset == "synthetic" and given:
        raise SegpromptError(f"{', '.join(given)} do(es) not apply to synthetic (it is generated, not converted)")


def _prepare_real(dataset: str, src: list[Path] | None, out: Path, expect_counts: str | None, workers: int,
                  force: bool, **options):
    from segprompt.data.prepare import parse_counts
    from segprompt.data.prepare import prepare as prepare_real

    with ExitStack() as stack:
        return prepare_real(dataset, src or [], out, expect_counts=parse_counts(expect_counts), nproc=workers,
                            force=force, progress=_stage_bars(stack),
                            log=lambda m: console.print(m, markup=False, highlight=False), **options)


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



def _prepare_folder(images: Path | None, masks: Path | None, out: Path, classes: str | None,
                    classes_file: Path | None, palette: str | None, mask_format: str, mask_suffix: str,
                    ignore_index: int, reduce_zero_label: bool, val_fraction: float | None, seed: int,
                    workers: int, force: bool):
    from segprompt.data.prepare.folder import (
        parse_classes,
        parse_palette,
        prepare_folder,
    )

    if images is None or masks is None:
        raise SegpromptError(f"`prepare folder` needs --images and --masks: {FOLDER_USAGE}")
    names, colours = parse_classes(classes, classes_file)
    if palette is not None:
        if colours is not None:
            raise SegpromptError("colours given twice: in --classes-file and with --palette; keep one")
        colours = parse_palette(palette, len(names))
    with ExitStack() as stack:
        return prepare_folder(images, masks, out, classes=names, palette=colours, mask_format=mask_format,
                              mask_suffix=mask_suffix, ignore_index=None if ignore_index == -1 else ignore_index,
                              reduce_zero_label=reduce_zero_label, val_fraction=val_fraction, seed=seed,
                              nproc=workers, force=force, progress=_stage_bars(stack),
                              log=lambda m: console.print(m, markup=False, highlight=False))


@app.command(epilog=EXAMPLES["browse"])
def browse(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe whose training samples to show.",
                                           autocompletion=complete_recipe)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs (iterNNNNNN_K_<stem>.png).")],
    n: Annotated[int, typer.Option("-n", help="How many samples.")] = 8,
    iteration: Annotated[int, typer.Option(help="The training iteration whose global batch comes first (1 = the "
                                                "first).")] = 1,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE; repeatable.")] = None,
    force: Annotated[bool, typer.Option(help="Replace files that already exist.")] = False,
) -> None:
    """The exact training samples of an iteration, after augmentation, with their labels overlaid
    (docs/watch.md)."""
    from segprompt.training.browse import browse as write_samples

    files = write_samples(recipe, out, count=n, iteration=iteration, overrides=set_ or [], force=force)
    console.print(f"wrote {len(files)} training sample(s), from iteration {iteration} on, to {out}",
                  markup=False, highlight=False)
