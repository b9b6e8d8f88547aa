"""The one exception type the CLI turns into a clean message (no traceback), and one-line
descriptions of the errors a user can fix: operating-system ones (full disk, permissions, a file
in the way) and a file ``torch.load`` cannot read."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class SegpromptError(Exception):
    """A user-facing error: the message names the file, key or value and says what to do."""


# errno -> what to do; the CLI prints these OSErrors as one `error:` line instead of a traceback
USER_OS_ERRORS = {
    errno.ENOSPC: "free space on that disk (or write elsewhere) and run again",
    errno.EDQUOT: "free space within your quota (or write elsewhere) and run again",
    errno.EACCES: "fix its permissions, or choose another place",
    errno.EPERM: "fix its permissions, or choose another place",
    errno.EROFS: "the file system is read-only; choose another place",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.EISDIR: "that path is a folder; name a file",
    errno.EEXIST: "something is already there; choose another path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ENOENT: "a folder on that path does not exist and cannot be created there; choose another path",
    errno.ELOOP: "the path loops through symbolic links; give a real path",
}


def os_problem(e: OSError, path: str | os.PathLike | None = None, *, hint: bool = True) -> str:
    """``'PATH': reason (ENOSPC); what to do`` for an OSError, naming ``path`` (default: the error's);
    without ``hint``, no "what to do"."""
    shown = Path(path if path is not None else e.filename if e.filename is not None else "?")
    reason, todo = e.strerror or str(e), USER_OS_ERRORS.get(e.errno) if hint else None
    code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__
    if e.errno in (errno.ENOTDIR, errno.EEXIST):  # name the file that stands where a folder should be
        blocker = next((p for p in shown.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # mkdir says EEXIST (of the file) or ENOTDIR (below it): one message
            reason, code = f"'{blocker}' is a file, not a folder", "ENOTDIR"
            todo = "choose another path" if hint else None
    return f"'{shown}': {reason} ({code})" + (f"; {todo}" if todo else "")


def torch_load_reason(e: Exception) -> str:
    """Why ``torch.load`` failed, in one line, without its advice on ``weights_only`` (which is
    about trusting a file, not about a corrupt one)."""
    text = " ".join(str(e).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation", 1)[0]
    reason = text.strip().split(". ", 1)[0].rstrip(".") or type(e).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


class NonFiniteLoss(SegpromptError):
    """Training met a non-finite loss: the run's settings (usually the learning rate) diverge.
    A learning-rate sweep (``segprompt demo``) records it as a diverged run rather than stopping."""


class RunInterrupted(BaseException):
    """Training stopped on SIGINT/SIGTERM at an iteration boundary; the message says how to resume.

    Not an ``Exception`` (as ``KeyboardInterrupt`` is not), so code that carries on after a failed
    run, such as ``segprompt ablate``, stops. The CLI exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, signum)
        self.message, self.signum = message, signum

    def __str__(self) -> str:
        return self.message


class RunCrashed(Exception):
    """A run died of an unexpected exception (a bug) whose traceback is already in its train.log."""
