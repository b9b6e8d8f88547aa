"""One writer per run directory: an exclusive ``flock`` on ``RUN/.lock`` for the life of the run.

Rank 0 of a training run takes the lock before it decides anything about the directory (new,
restarted or resumed) and holds it until the run ends. The kernel drops it when the process dies,
SIGKILL included, so a lock is never stale and there is nothing to clean up. The file records the
holder's PID, host and start time, which is what a second process is told (docs/runs.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from segprompt.errors import SegpromptError, os_problem

LOCK = ".lock"


class RunDirInUse(SegpromptError):
    """Another process holds the run directory's lock."""


class RunLock:
    """A held lock; :meth:`release` (or the end of the process) gives it up."""

    def __init__(self, fd: int | None, path: Path, note: str | None = None):
        self.fd, self.path = fd, path
        self.note = note  # why the directory could not be locked, for the run's log

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _holder_text(path: Path) -> str:
    # the holder writes its record right after locking: a reader may be a few ms early
    for _ in range(20):
        try:
            rec = json.loads(path.read_text())
            return f"PID {rec['pid']} on host {rec['host']} (since {rec['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another process (it has not recorded its PID)"


def lock_run_dir(run_dir: Path) -> RunLock:
    """Create ``run_dir`` if needed and lock it, or raise :class:`RunDirInUse` naming the holder."""
    path = Path(run_dir) / LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise SegpromptError(f"cannot create run directory {os_problem(e, run_dir, hint=False)}; "
                             f"choose another --out") from None
    try:
        for attempt in range(5):  # a moment's grace for `holder`, which takes the lock briefly to look
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    raise
                time.sleep(0.1)
    except BlockingIOError:
        os.close(fd)
        raise RunDirInUse(f"run directory '{run_dir}' is in use by {_holder_text(path)}: one process writes a run "
                          f"at a time. Wait for it to end, or choose another --out") from None
    except OSError as e:  # a file system without flock (some network mounts): run, but say so
        os.close(fd)
        return RunLock(None, path, f"could not lock '{path}' ({e.strerror}): nothing stops a second process "
                                   f"from writing this run directory at the same time")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return RunLock(fd, path)


def holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock ("PID ... on host ..."), or None; creates nothing."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(path)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def refuse_live_run(path: str | Path, what: str) -> None:
    """Refuse to write ``path`` (``what``: e.g. "--out") when it lies in a run directory that a live
    trainer holds: a running run is read-only to every other command (docs/runs.md)."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if (folder / LOCK).is_file():
            who = holder(folder)
            if who is not None:
                raise RunDirInUse(f"{what} '{path}' is inside the run '{folder}', which {who} is training; a "
                                  f"running run is read-only to other commands: write elsewhere, or wait for it "
                                  f"to end")
            return
