"""Commands that train or use a model: ``train``, ``eval``, ``predict`` and ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from segprompt.cli.app import (
    EXAMPLES,
    app,
    complete_recipe,
    console,
    err_console,
    is_main,
)
from segprompt.errors import SegpromptError

WEIGHTS_HELP = ("The frozen backbone's weights file, when it is no longer where the run recorded it (checked by its "
                "SHA-256).")


@app.command("train", epilog=EXAMPLES["train"])
def train_cmd(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="A recipe file, or the name of a shipped recipe (e.g. smoke, "
                                                "spm/ade20k_r101_spm; docs/recipes.md).",
                                           autocompletion=complete_recipe)],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE (YAML scalar); repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default results/<recipe>/<timestamp>/).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="'auto' (latest run of the recipe, or --out) or a checkpoint/run path.")] = None,
    load_from: Annotated[Optional[Path], typer.Option(help="Initialise weights from a run directory (its best.pt), a "
                                                           "checkpoint (segprompt, MMSegmentation or a state dict); "
                                                           "the iteration counter starts at 0. It must supply at "
                                                           "least half of the model's tensors.")] = None,
    load_from_partial: Annotated[bool, typer.Option("--load-from-partial", help="Load what matches by name and shape "
                                                                                "(e.g. a run on other classes: its "
                                                                                "head is re-initialised) and list "
                                                                                "the rest.")] = False,
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
    from segprompt.training.launch import train

    train(recipe, overrides, out=out, resume=resume, load_from=load_from, load_from_partial=load_from_partial)


@app.command("eval", epilog=EXAMPLES["eval"])
def eval_cmd(
    target: Annotated[Path, typer.Argument(metavar="RUN", help="A run directory, a checkpoint file, a delta (.safetensors), or a "
                                                "recipe (then --checkpoint PATH).")],
    checkpoint: Annotated[Optional[str], typer.Option(help="Run directory: best (default) | last | deployed "
                                                           "(text-guided runs) | PATH; recipe: PATH.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="whole | slide (default: the recipe's).")] = None,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Multi-scale + flip test-time augmentation.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to evaluate (default data.val_split).")] = None,
    save_preds: Annotated[Optional[Path], typer.Option(help="Write index PNGs and colour overlays here.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help=WEIGHTS_HELP)] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE; repeatable.")] = None,
) -> None:
    """Evaluate a checkpoint: aAcc, mIoU, mAcc, mDice, mFscore and a per-class table."""
    if mode is not None and mode not in ("whole", "slide"):
        raise SegpromptError(f"--mode '{mode}' is not one of: whole, slide")
    from segprompt.evaluation.evaluate import evaluate_checkpoint
    from segprompt.evaluation.metrics import format_table, summary_line

    written, result = evaluate_checkpoint(target, checkpoint=checkpoint, overrides=set_ or [], mode=mode, tta=tta,
                                          split=split, save_preds=save_preds, weights=weights)
    if is_main():
        console.print(format_table(result))
        console.print(summary_line(result), soft_wrap=True, markup=False, highlight=False)
        it = f" (iteration {result['iter']})" if result.get("iter") is not None else ""
        console.print(f"checkpoint {result['checkpoint']}{it}, split {result['split']}", markup=False, highlight=False)
        if save_preds is not None:
            console.print(f"wrote {result['images']} predictions (<stem>.png class ids, <stem>_overlay.png) to "
                          f"{save_preds}", markup=False, highlight=False)
        console.print(f"wrote {written}", markup=False, highlight=False)


@app.command("predict", epilog=EXAMPLES["predict"])
def predict_cmd(
    target: Annotated[Path, typer.Argument(metavar="RUN", help="A run directory, one of its checkpoints, or a delta (.safetensors); "
                                                "each works from any folder. With --tasks: the first INPUT.")],
    inputs: Annotated[Optional[list[str]], typer.Argument(metavar="IMAGE", help="Image files, folders (recursive) or quoted "
                                                               "globs.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the predictions; each keeps its input's relative "
                                                    "path and stem (with --tasks: under OUT/<task>/).")] = ...,
    tasks: Annotated[Optional[list[str]], typer.Option("--tasks", help="Run directories or deltas (comma-separated "
                                                       "or repeated; NAME=RUN names a task) served on one frozen "
                                                       "backbone: every input under every task.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="best (default) | last | deployed | PATH "
                                                           "(--tasks: best | last).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="whole | slide (default: the recipe's).")] = None,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Multi-scale + flip test-time "
                                                                       "augmentation (default: the recipe's).")] = None,
    format_: Annotated[Optional[list[str]], typer.Option("--format", help="index | color | overlay; repeatable "
                                                         "or comma-separated (default: index,overlay).")] = None,
    batch: Annotated[int, typer.Option(help="Images decoded at a time; those of one size share a forward pass.")] = 1,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N (default: runtime.device; "
                                                       "--tasks: auto).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at an unreadable image instead of skipping it.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite outputs that already exist.")] = False,
    legend: Annotated[bool, typer.Option("--legend", help="Add a legend (the classes present) beside colour and "
                                                          "overlay images.")] = False,
    weights: Annotated[Optional[Path], typer.Option(help=WEIGHTS_HELP)] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE; repeatable.")] = None,
) -> None:
    """Segment your own images with a trained run, or several on one backbone (--tasks).

    The recipe's test pipeline and inference, as eval (docs/predict.md)."""
    from segprompt.serve.predict import parse_formats, predict, predict_tasks, summary

    common = dict(checkpoint=checkpoint, mode=mode, tta=tta, formats=parse_formats(format_), batch=batch,
                  device=device, strict=strict, force=force, legend=legend)
    if tasks:
        if set_:
            raise SegpromptError("--set changes one recipe; with --tasks each run keeps its own config.yaml (drop "
                                 "--set, or predict that run alone)")
        result = predict_tasks(tasks, [str(target), *(inputs or [])], out, weights=weights, **common)
    else:
        result = predict(target, inputs or [], out, overrides=set_ or [], weights=weights, **common)
    done, problems = summary(result, out)
    console.print(done, markup=False, highlight=False)
    for line in problems:
        err_console.print(line, markup=False, highlight=False)
    if result.images == 0:  # nothing to show for it: a failure, for scripts too
        raise SegpromptError(f"no image was predicted ({len(result.skipped)} unreadable or refused)")


@app.command("export", epilog=EXAMPLES["export"])
def export_cmd(
    target: Annotated[Path, typer.Argument(metavar="RUN", help="A run directory, a checkpoint, a delta, or a recipe (with --checkpoint "
                                                "PATH for trained weights; without, random weights as bench builds "
                                                "it).")],
    out: Annotated[Path, typer.Option(help="File to write (.onnx for ONNX, .safetensors for a delta); an ONNX or "
                                           "TorchScript file's record goes to FILE.json.")],
    format_: Annotated[str, typer.Option("--format", help="onnx | torchscript | delta (what training changed, to "
                                                          "share) | checkpoint (the whole model, LoRA merged, "
                                                          "as a plain .pt): docs/api.md.")] = "onnx",
    size: Annotated[Optional[str], typer.Option(help="HxW of the exported input (default: data.test.scale).")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Batch, height and width left symbolic.")] = False,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 (weights and input).")] = "fp32",
    checkpoint: Annotated[Optional[str], typer.Option(help="Run directory: auto (deployed.pt if the run has one, "
                                                           "else best.pt) | best | last | deployed | PATH; "
                                                           "recipe: PATH.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override KEY.PATH=VALUE; repeatable.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out file and its record.")] = False,
    weights: Annotated[Optional[Path], typer.Option(help=WEIGHTS_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Export the deployed model to ONNX or TorchScript, verified against PyTorch.

    The whole-image forward, LoRA merged, text embeddings baked in; parity on a sample input is
    printed and stored in FILE.json (docs/deploy.md)."""
    import json

    if format_ in ("delta", "checkpoint"):
        from segprompt.serve.share import delta_lines, export_checkpoint, export_delta

        if size or dynamic or dtype != "fp32" or set_:
            raise SegpromptError(f"--size, --dynamic, --dtype and --set shape an exported graph; a {format_} holds "
                                 f"the trained tensors as they are: drop them")
        export = export_delta if format_ == "delta" else export_checkpoint
        record = export(target, out, checkpoint=checkpoint, weights=weights, force=force)
        if as_json:
            console.print_json(json.dumps(record))
        elif format_ == "delta":
            for line in delta_lines(record):
                console.print(line, markup=False, highlight=False)
        else:
            console.print(f"the whole model: {record['tensors']} tensors, {record['file_bytes'] / 1e6:.2f} MB, "
                          f"{record['lora_merged']} LoRA layer(s) merged; it needs no frozen weights file",
                          markup=False, highlight=False)
        err_console.print(f"wrote {out}", highlight=False)
        return
    from segprompt.measure.bench import parse_size
    from segprompt.serve.export import (
        ExportOptions,
        export_model,
        sidecar,
        summary_lines,
    )

    opts = ExportOptions(format=format_, size=parse_size(size) if size else None, dynamic=dynamic, dtype=dtype,
                         checkpoint=checkpoint, force=force)
    record = export_model(target, out, opts, set_ or [], weights=weights)
    if as_json:
        console.print_json(json.dumps(record))
    else:
        for line in summary_lines(record):
            console.print(line, markup=False, highlight=False)
    for path in (out, sidecar(out)):
        err_console.print(f"wrote {path}", highlight=False)
