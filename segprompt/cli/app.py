"""The typer application and the two consoles every command prints to."""

from __future__ import annotations

import os

import typer
import typer.core
from rich.console import Console

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


def is_main() -> bool:
    """Whether this process prints for the run (rank 0 of a torchrun, or the only process)."""
    return os.environ.get("RANK", "0") == "0"
