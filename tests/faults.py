"""Fault injection for tests: make the machine misbehave the way a user's machine does."""

from __future__ import annotations

import errno
import os

# disk faults


class _FullDisk:
    """A file object whose writes fail as on a full disk; everything else is the real file's."""

    def __init__(self, f, err: int):
        self._f, self._err = f, err

    def write(self, data) -> int:
        raise OSError(self._err, os.strerror(self._err))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def fail_atomic_writes(monkeypatch, name: str, *, after: int = 0, err: int = errno.ENOSPC) -> list[str]:
    """Make :func:`segprompt.io.atomic_write_bytes` fail with ``OSError(err)`` (default ENOSPC, a full
    disk) when it writes the data of a file called ``name``, after ``after`` such writes succeeded.
    The temporary file is created as usual, so the test sees what a real full disk leaves behind.
    Returns the list of destinations whose write failed (filled in as it happens)."""
    import segprompt.io as sio

    create, fdopen = sio._create_temp, os.fdopen
    doomed: set[int] = set()
    failed: list[str] = []
    seen = [0]

    def create_temp(path):
        fd, tmp = create(path)
        if path.name == name:
            seen[0] += 1
            if seen[0] > after:
                doomed.add(fd)
                failed.append(str(path))
        return fd, tmp

    def fdopen_(fd, *args, **kwargs):
        f = fdopen(fd, *args, **kwargs)
        if fd in doomed:
            doomed.discard(fd)
            return _FullDisk(f, err)
        return f

    monkeypatch.setattr(sio, "_create_temp", create_temp)
    monkeypatch.setattr(os, "fdopen", fdopen_)
    return failed


def forbid_dir(monkeypatch, folder, err: int = errno.EACCES) -> None:
    """Make creating anything inside ``folder`` fail with ``OSError(err)`` (default EACCES), as in
    a folder the user may not write to; tests run as root, where ``chmod`` cannot provoke that."""
    from pathlib import Path

    folder = Path(folder).resolve()
    mkdir, open_ = Path.mkdir, os.open

    def inside(p) -> bool:
        return folder in Path(p).resolve().parents

    def mkdir_(self, *args, **kwargs):
        if inside(self) and not self.exists():
            raise OSError(err, os.strerror(err), str(self))
        return mkdir(self, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and inside(path):
            raise OSError(err, os.strerror(err), str(path))
        return open_(path, flags, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir_)
    monkeypatch.setattr(os, "open", os_open)
