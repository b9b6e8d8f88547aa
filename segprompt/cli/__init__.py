"""`segprompt` command line (typer + rich): one module per group of commands (data, run, measure,
experiments) on one app (``cli/app.py``); :func:`main` turns errors into one line and an exit status.

The CLI only parses arguments and prints; all work happens in the layers below (:mod:`segprompt.training`, :mod:`segprompt.serve`, ...) and
:mod:`segprompt.data`. User errors (:class:`SegpromptError`, and the OS errors of
``USER_OS_ERRORS``: a full disk, no permission, a file in the way) print one clear message and
exit 2. Off a terminal (a log file, a pipe) nothing is wrapped at 80 columns.

Each command imports what it runs inside its function, so ``segprompt --help`` and a mistyped
option answer at once, without loading torch.
"""

from __future__ import annotations

import sys

# each module registers its commands on app; this order is the order of `segprompt --help`
from segprompt.cli import data, experiments, measure, run  # noqa: F401, I001
from segprompt.cli.app import app, console, err_console, is_main
from segprompt.errors import (
    USER_OS_ERRORS,
    RunCrashed,
    RunInterrupted,
    SegpromptError,
    os_problem,
)


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
        if is_main():
            err_console.print(str(e), markup=False, highlight=False, soft_wrap=True)
        sys.exit(128 + e.signum)
    except RunCrashed as e:  # the traceback is in the run's train.log
        _fail(str(e), status=1)
    except OSError as e:  # an input or output path the OS refused: one line naming it and the errno
        if e.errno not in USER_OS_ERRORS and e.filename is None:
            raise
        _fail(os_problem(e))


def _fail(message: str, status: int = 2) -> None:
    err_console.print("[bold red]error:[/] ", end="", markup=True, highlight=False)
    err_console.print(message, markup=False, highlight=False)
    sys.exit(status)
