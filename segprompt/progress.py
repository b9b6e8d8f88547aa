"""Rich progress bars (rank 0 only) with ETA, throughput and live loss/lr, and the consoles
that print tables."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# off a terminal rich would lay everything out in 80 columns, wrapping table cells over lines
OFF_TERMINAL_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    """A console whose tables survive a pipe or a log file: off a terminal (and without
    ``COLUMNS``) it is wide enough that every table prints at its natural width, never wrapped or
    cut (tables do not stretch to the console's width)."""
    console = Console(stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = OFF_TERMINAL_WIDTH
    return console


class RateColumn(ProgressColumn):
    """Items per second; a task's ``unit=`` field names the item (default ``it``)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:.2f} {unit}/s" if task.speed else f"-- {unit}/s")


class _Silent:
    """Stands in for the bar on ranks other than 0."""

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | _Silent]:
    """Tasks take ``info=`` text (loss, lr) shown after the ETA."""
    if not enabled:
        yield _Silent()
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}")) as bar:
        yield bar
