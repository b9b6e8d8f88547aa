"""Rich progress bars (rank 0 only) with ETA, throughput and live loss/lr."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s")


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
