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


def _flag_shows_no_type(display_type_rich):
    """typer's rich help gives flags (which take no value) the type ``<bool>``; show none."""
    def display(self, ctx):
        return None if self.is_flag else display_type_rich(self, ctx)
    return display


typer.core.TyperOption.display_type_rich = _flag_shows_no_type(typer.core.TyperOption.display_type_rich)


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
