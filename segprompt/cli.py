"""`segprompt` command line: prepare, train and eval (typer + rich).

The CLI only parses arguments and prints; all work happens in :mod:`segprompt.engine` and
:mod:`segprompt.data`. User errors (:class:`SegpromptError`, and the OS errors of
``USER_OS_ERRORS``: a full disk, no permission, a file in the way) print one clear message and
exit 2. Off a terminal (a log file, a pipe) nothing is wrapped at 80 columns.

Each command imports what it runs inside its function, so ``segprompt --help`` and a mistyped
option answer at once, without loading torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core
from rich.console import Console

from segprompt.data.prepare import DATASETS
from segprompt.errors import USER_OS_ERRORS, RunCrashed, RunInterrupted, SegpromptError, os_problem

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient and text-guided semantic segmentation experiments.")
console = Console()
err_console = Console(stderr=True)


def _flag_shows_no_type(display_type_rich):
    """typer's rich help gives flags (which take no value) the type ``<bool>``; show none."""
    def display(self, ctx):
        return None if self.is_flag else display_type_rich(self, ctx)
    return display


typer.core.TyperOption.display_type_rich = _flag_shows_no_type(typer.core.TyperOption.display_type_rich)

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
    import os
    from contextlib import ExitStack

    from segprompt.data.meta import META_FILE
    from segprompt.progress import progress_bar

    if dataset not in PREPARERS:
        raise SegpromptError(f"unknown dataset '{dataset}'; `segprompt prepare` knows: {', '.join(PREPARERS)}")
    workers = nproc if nproc is not None else min(os.cpu_count() or 1, 8)
    if workers < 1:
        raise SegpromptError(f"--nproc must be at least 1, got {workers}")

    def stages(stack: ExitStack):  # one bar per stage (hashing, converting, verifying, class prior)
        tasks: dict[str, int] = {}
        bars = []

        def update(stage: str, done: int, total: int) -> None:
            if not bars:  # started on the first report, so an early error prints alone
                bars.append(stack.enter_context(progress_bar()))
            if stage not in tasks:
                tasks[stage] = bars[0].add_task(stage, total=total, info="")
            bars[0].update(tasks[stage], completed=done, total=total)
        return update

    if check:
        from segprompt.data.prepare.check import check as check_prepared

        with ExitStack() as stack:
            meta = check_prepared(dataset, out, nproc=workers, progress=stages(stack))
        console.print(f"[green]ok[/] {meta.name} at {out}: "
                      + ", ".join(f"{k} {v}" for k, v in meta.splits.items()) + f"; {meta.num_classes} classes; "
                      "every file decodes, sizes agree, label values and counts as recorded")
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
                                force=force, progress=stages(stack),
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


@app.command("train")
def train_cmd(
    recipe: Annotated[Path, typer.Argument(help="A recipe file, or the name of a shipped recipe (e.g. smoke, "
                                                "spm/ade20k_r101_spm; docs/recipes.md).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE (YAML scalar); repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default results/<recipe>/<timestamp>/).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="'auto' (latest run of the recipe, or --out) or a checkpoint/run path.")] = None,
    load_from: Annotated[Optional[Path], typer.Option(help="Initialise weights from a checkpoint (segprompt, MMSegmentation "
                                                           "or a state dict); the iteration counter starts at 0. It must "
                                                           "supply at least half of the model's tensors.")] = None,
    load_from_partial: Annotated[bool, typer.Option("--load-from-partial", help="Let --load-from supply fewer than half "
                                                                                "of the model's tensors.")] = False,
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
    if load_from_partial and not load_from:
        raise SegpromptError("--load-from-partial goes with --load-from PATH")
    from segprompt.engine.train import train

    train(recipe, overrides, out=out, resume=resume, load_from=load_from, load_from_partial=load_from_partial)


@app.command("eval")
def eval_cmd(
    target: Annotated[Path, typer.Argument(help="A run directory, or a recipe (then --checkpoint PATH).")],
    checkpoint: Annotated[str, typer.Option(help="best | last | deployed (text-guided runs) | PATH.")] = "best",
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
        it = f" (iteration {result['iter']})" if result.get("iter") is not None else ""
        console.print(f"checkpoint {result['checkpoint']}{it}, split {result['split']}", markup=False, highlight=False)
        if save_preds is not None:
            console.print(f"wrote {result['images']} predictions (<stem>.png class ids, <stem>_overlay.png) to "
                          f"{save_preds}", markup=False, highlight=False)
        console.print(f"wrote {run_dir / 'eval.json'}", markup=False, highlight=False)


@app.command("predict")
def predict_cmd(
    target: Annotated[Path, typer.Argument(help="A run directory, or one of its checkpoints (a checkpoint that "
                                                "holds its recipe works anywhere).")],
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or quoted globs.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the predictions; each keeps its input's relative "
                                                    "path and stem.")],
    checkpoint: Annotated[Optional[str], typer.Option(help="best (default) | last | deployed | PATH.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="whole | slide (default: the recipe's).")] = None,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Multi-scale + flip test-time "
                                                                       "augmentation (default: the recipe's).")] = None,
    format_: Annotated[Optional[list[str]], typer.Option("--format", help="index | color | overlay; repeatable "
                                                         "or comma-separated (default: index,overlay).")] = None,
    batch: Annotated[int, typer.Option(help="Images decoded at a time; those of one size share a forward pass.")] = 1,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N (default: runtime.device).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at an unreadable image instead of skipping it.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite outputs that already exist.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE; repeatable.")] = None,
) -> None:
    """Segment your own images with a trained run: the recipe's test pipeline and inference, as eval."""
    from segprompt.engine.predict import parse_formats, predict

    r = predict(target, inputs, out, checkpoint=checkpoint, mode=mode, tta=tta, formats=parse_formats(format_),
                batch=batch, device=device, strict=strict, force=force, overrides=set_ or [])
    it = f" (iteration {r.iteration})" if r.iteration is not None else ""
    console.print(f"predicted {r.images} image(s) in {r.seconds:.1f} s ({r.images / max(r.seconds, 1e-9):.1f} "
                  f"img/s) with {r.checkpoint}{it}; wrote {len(r.files)} file(s) to {out}", markup=False,
                  highlight=False)
    for _, why in r.skipped[:20]:
        err_console.print(f"skipped: {why}", markup=False, highlight=False)
    if r.skipped:
        more = f" ({len(r.skipped) - 20} more not listed)" if len(r.skipped) > 20 else ""
        err_console.print(f"skipped {len(r.skipped)} unreadable image(s){more}; --strict makes that an error",
                          markup=False, highlight=False)


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
    from segprompt.measure.params import CONVENTIONS, breakdown

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
def bench(
    recipe: Annotated[Path, typer.Argument(help="A recipe, a run directory (its config.yaml; bench.json is "
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
    """Parameters, FLOPs and inference speed (batch 1, random weights, text prompts deployed), as the
    CLIP-distilled STDC-Seg paper measures FPS; an exported .onnx file is timed with onnxruntime."""
    import json

    from segprompt.io import atomic_write_json
    from segprompt.measure.bench import BenchOptions, check_out, format_table, parse_size, run_bench, save_run_bench

    check_out(out, force)
    opts = BenchOptions(size=parse_size(size) if size else None, dtype=dtype, channels_last=channels_last,
                        compile=compile_, device=device, warmup=warmup, calib_iters=calib_iters,
                        calib_seconds=calib_seconds, seconds=seconds, chunks=chunks, threads=threads,
                        provider=provider)
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
        if "vs" in result:
            console.print(f"fps ratio {Path(result['recipe']).name} ({result['engine']}) / "
                          f"{Path(result['vs']['recipe']).name} ({result['vs']['engine']}): {result['fps_ratio']:.3f}")
    for path in written:
        err_console.print(f"wrote {path}", highlight=False)


@app.command("export")
def export_cmd(
    target: Annotated[Path, typer.Argument(help="A run directory, or a recipe (with --checkpoint PATH for trained "
                                                "weights; without, random weights as bench builds it).")],
    out: Annotated[Path, typer.Option(help="File to write (.onnx for ONNX); its record goes to FILE.json.")],
    format_: Annotated[str, typer.Option("--format", help="onnx | torchscript.")] = "onnx",
    size: Annotated[Optional[str], typer.Option(help="HxW of the exported input (default: data.test.scale).")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Batch, height and width left symbolic.")] = False,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 (weights and input).")] = "fp32",
    checkpoint: Annotated[Optional[str], typer.Option(help="Run directory: auto (deployed.pt if the run has one, "
                                                           "else best.pt) | best | last | deployed | PATH; "
                                                           "recipe: PATH.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE; repeatable.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out file and its record.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Export the deployed inference model (whole-image forward, LoRA merged, text embeddings baked in)
    to ONNX or TorchScript, and verify it against PyTorch on a sample input (docs/deploy.md)."""
    import json

    from segprompt.engine.export import ExportOptions, export_model, sidecar
    from segprompt.measure.bench import parse_size

    opts = ExportOptions(format=format_, size=parse_size(size) if size else None, dynamic=dynamic, dtype=dtype,
                         checkpoint=checkpoint, force=force)
    record = export_model(target, out, opts, set_ or [])
    if as_json:
        console.print_json(json.dumps(record))
    else:
        facts = f"opset {record['opset']}, " if "opset" in record else ""
        console.print(f"{record['format']} {facts}{record['dtype']}, input {record['input_shape']} -> output "
                      f"{record['output_shape']}, {record['file_bytes'] / 1e6:.1f} MB; {record['weights']}"
                      + (f", {record['lora_merged']} LoRA layers merged" if record["lora_merged"] else "")
                      + (", text embeddings baked in" if record["text_deployed"] else ""),
                      markup=False, highlight=False)
        for c in record["parity"]["checks"]:
            console.print(f"{record['parity']['runtime']} vs PyTorch on {c['shape']}: max |diff| "
                          f"{c['max_abs_diff']:.2e} (max |logit| {c['max_abs_logit']:.3g}), argmax agreement "
                          f"{100 * c['argmax_agreement']:.3f} %", markup=False, highlight=False)
    for path in (out, sidecar(out)):
        err_console.print(f"wrote {path}", highlight=False)


@app.command()
def demo(
    out: Annotated[Optional[Path], typer.Option(help="Where the runs and the report go "
                                                     "(default results/demo/<timestamp>/).")] = None,
    backbone: Annotated[str, typer.Option(help="resnet (the default, ~8 min on 2 CPU cores) or vit (adds VPT and "
                                               "AdaptFormer; ~30 min on 2 CPU cores).")] = "resnet",
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated tuning methods (head and full are needed; "
                                                        "default: all of the backbone's).")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Seeds per method (default: the scale's, 3 for quick).")] = None,
    scale: Annotated[str, typer.Option(help="quick (~6 min on 2 CPU cores) or full (longer, larger; a GPU).")] = "quick",
    workers: Annotated[Optional[int], typer.Option(help="Runs in parallel (default: min(2, CPU cores)).")] = None,
    controls: Annotated[bool, typer.Option(help="Also tune one backbone stage at a time (where the gap lives).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic domains.")] = 0,
) -> None:
    """A fair miniature of the SPM paper's claim: pre-train a small network on a synthetic source
    (cached), adapt it to a shifted target with each method (equal lr sweep chosen on target val,
    several seeds, target-test mIoU), report gap recovered and a verdict computed from the table."""
    import time

    from rich.table import Table

    from segprompt.engine.rundir import new_run_dir
    from segprompt.experiments.demo import SCALES, check_methods, run_demo
    from segprompt.experiments.demo_report import edge_note, rows_from_report, table_lines

    if scale not in SCALES:
        raise SegpromptError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
    chosen = check_methods(backbone, None if methods is None else [m.strip() for m in methods.split(",") if m.strip()])
    out = new_run_dir(out or Path("results/demo") / time.strftime("%Y%m%d-%H%M%S"))
    report = run_demo(out, chosen, backbone=backbone, scale=scale, seeds=seeds, seed=seed, workers=workers, controls=controls,
                      progress=lambda msg: err_console.print(msg, highlight=False))
    cols, lines = table_lines(report, rows_from_report(report))
    sc = report["scale"]
    table = Table(title=f"segprompt demo ({backbone}, {scale}): source -> target transfer, {sc['classes']} classes, "
                        f"target-test mIoU over {sc['seeds']} seed(s)")
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for line in lines:
        table.add_row(*line)
    console.print(f"source model: source-val mIoU {report['source_val_mIoU']:.2f}")
    console.print(table)
    diag = report["spm_diagnostics"]
    slots = sorted({k.split("_")[0] for k in diag})
    if slots:
        console.print("SPM (seed 0) per slot: " + "; ".join(
            f"{s}: interim-map mIoU {diag.get(s + '_interim_mIoU', float('nan')):.1f}, "
            f"prompt size {diag.get(s + '_prompt_ratio', float('nan')):.3f}" for s in slots))
    console.print(f"verdict: {report['verdict']}")
    if report["edge_of_grid"]:
        console.print(edge_note(report))
    console.print(f"report: {out / 'demo.md'}, {out / 'demo.csv'}, {out / 'demo.json'}, {out / 'demo.png'} "
                  f"({report['seconds']:.0f} s)")


@app.command()
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
    """Reproduce a paper's table: launch its missing or interrupted runs, then collect ours beside the
    paper's (--plan only prints the runs, --collect only reads them)."""
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


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _user_message(e: SegpromptError) -> str:
    # DataLoader workers re-raise with the worker's traceback in the text: keep the message.
    text = str(e)
    marker = "SegpromptError: "
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text


def main(argv: list[str] | None = None) -> None:
    for c in (console, err_console):
        c.soft_wrap = not c.is_terminal  # a log file or a pipe gets whole lines
    try:
        app(args=argv)
    except SegpromptError as e:
        _fail(_user_message(e))
    except RunInterrupted as e:  # last.pt saved; the message says how to resume (docs/runs.md)
        if _is_main():
            err_console.print(str(e), markup=False, highlight=False, soft_wrap=True)
        sys.exit(128 + e.signum)
    except RunCrashed as e:  # the traceback is in the run's train.log
        _fail(str(e), status=1)
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        _fail(os_problem(e))


def _fail(message: str, status: int = 2) -> None:
    err_console.print("[bold red]error:[/] ", end="", markup=True, highlight=False)
    err_console.print(message, markup=False, highlight=False)
    sys.exit(status)
