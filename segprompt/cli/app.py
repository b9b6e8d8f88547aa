"""The typer application and the two consoles every command prints to."""

from __future__ import annotations

import os

import typer
import typer.core

from segprompt.progress import make_console

# shell completion: `segprompt --install-completion` (bash, zsh, fish, PowerShell); recipe arguments
# complete the shipped recipes' names (complete_recipe)
app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient and text-guided semantic segmentation experiments.")
console = make_console()
err_console = make_console(stderr=True)


def _examples(*lines: str) -> str:
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


# the end of each command's --help: one or two command lines that work as written
EXAMPLES = {
    "prepare": _examples("segprompt prepare synthetic --out data/synthetic",
                         "segprompt prepare folder --images photos --masks masks --classes background,crack "
                         "--val-fraction 0.2 --out data/cracks"),
    "browse": _examples("segprompt browse smoke -n 8 --out samples",
                        "segprompt browse custom/lite0_spm --set data.root=data/cracks --iteration 500 --out samples"),
    "train": _examples("segprompt train smoke", "segprompt train custom/lite0_spm --set data.root=data/cracks "
                       "--out runs/cracks"),
    "eval": _examples("segprompt eval runs/cracks", "segprompt eval runs/cracks --split test --save-preds"),
    "predict": _examples("segprompt predict runs/cracks photos/ --out predictions --format overlay --legend"),
    "export": _examples("segprompt export runs/cracks --format onnx --out cracks.onnx",
                        "segprompt export runs/cracks --format delta --out cracks.safetensors"),
    "bench": _examples("segprompt bench runs/cracks", "segprompt bench cracks.onnx --vs runs/cracks"),
    "count-params": _examples("segprompt count-params smoke --set tuning.name=spm",
                              "segprompt count-params --table 1"),
    "demo": _examples("segprompt demo", "segprompt demo --backbone efficientnet_lite0 --out results/demo/lite0"),
    "ablate": _examples("segprompt ablate --list", "segprompt ablate --table 4 --plan"),
    "plot": _examples("segprompt plot runs/cracks --out curves.png",
                      "segprompt plot runs/cracks --confusion --out confusion.png"),
}


def _flag_shows_no_type(display_type_rich):
    """typer's rich help gives flags (which take no value) the type ``<bool>``; show none."""
    def display(self, ctx):
        return None if self.is_flag else display_type_rich(self, ctx)
    return display


typer.core.TyperOption.display_type_rich = _flag_shows_no_type(typer.core.TyperOption.display_type_rich)


def _usage_name(usage_display_name):
    """typer writes a required argument as ``{recipe}`` on the usage line; write ``RECIPE``, the
    convention of man pages and of click before typer 0.20 (the name comes from its metavar)."""
    def display(self):
        name = usage_display_name(self)
        return name[1:].split("}", 1)[0] + name.split("}", 1)[1] if name.startswith("{") else name
    return display


typer.core.TyperArgument._usage_display_name = _usage_name(typer.core.TyperArgument._usage_display_name)


def complete_recipe(incomplete: str) -> list[str]:
    """The shipped recipes whose names start with ``incomplete`` (``smoke``, ``spm/ade20k_r101_spm``;
    not the ``_base/`` fragments or the ``tables/`` grids), for shell completion."""
    from segprompt.config.files import shipped_recipes

    root = shipped_recipes()
    names = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")
                   if p.relative_to(root).parts[0] not in ("_base", "tables"))
    return [n for n in names if n.startswith(incomplete)]


def is_main() -> bool:
    """Whether this process prints for the run (rank 0 of a torchrun, or the only process)."""
    return os.environ.get("RANK", "0") == "0"
