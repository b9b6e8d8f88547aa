"""Atomic file writes and hashing: every write a user relies on goes through here.

A write lands in a temporary file in the destination folder, is flushed to disk, and is renamed
over the destination in one step, so a crash (or SIGKILL) leaves either the old file or the new
one, never a half-written file that a later run would trust. The file gets the mode any other
file would (0666 less the umask; ``mkstemp`` would make it 0600), and a failed write raises the
``OSError`` naming the destination, not the temporary file.

A temporary's name carries the writing process's PID and host (``.<name>.~<pid>@<host>~<random>.tmp``),
so the next run can tell leftovers of a killed process from another process's write in progress:
:func:`remove_stale_temporaries` removes only those whose PID is not alive on this host (docs/runs.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from segprompt.errors import SegpromptError

_TEMP = re.compile(r"^\.(?P<name>.+)\.~(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)~[^/]*\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "_"


def temp_prefix(path: str | os.PathLike, pid: int | None = None) -> str:
    """Prefix of the temporaries of ``path`` written by this process (or ``pid`` on this host);
    add a random part and ``.tmp``."""
    return f".{Path(path).name}.~{os.getpid() if pid is None else pid}@{_host()}~"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like one of our temporaries (of any process)."""
    return _TEMP.match(Path(path).name) is not None


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries in ``folder`` (of ``name`` only, if given) left by processes that are
    dead; those of live processes and of other hosts are kept. Returns what was removed."""
    folder, host, removed = Path(folder), _host(), []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        m = _TEMP.match(p.name)
        if m is None or m["host"] != host or (name is not None and m["name"] != name) or pid_alive(int(m["pid"])):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:  # another process cleaned it up first
            continue
        removed.append(p)
    return removed


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new temporary beside ``path`` (named by :func:`temp_prefix`), opened for writing with mode
    0666 less the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f"{temp_prefix(path)}{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


_SWEPT: set[str] = set()  # folders whose dead processes' temporaries this process has removed


def _sweep_once(folder: Path) -> None:
    """Before the first atomic write into ``folder`` in this process, remove the temporaries that
    dead processes left there (a killed export, predict, eval, ablate or demo): every command that
    writes atomically cleans up after the ones that died, at the cost of one listing per folder."""
    key = os.path.realpath(folder)
    if key not in _SWEPT:
        _SWEPT.add(key)
        remove_stale_temporaries(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(path.parent)
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:  # name what the user asked to write
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch  # here, not at the top: io is imported by the CLI, which starts without torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def move_aside(path: Path, tag: str = "old") -> Path:
    """Rename ``path`` to ``<path>.<tag>-<timestamp>[-k]`` beside it and return the new name: what
    a newer result replaces is kept, never deleted."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, k = path.with_name(f"{path.name}.{tag}-{stamp}"), 1
    while aside.exists():
        aside, k = path.with_name(f"{path.name}.{tag}-{stamp}-{k}"), k + 1
    os.rename(path, aside)
    return aside


def write_json_keeping_history(path: Path, data: Any, history: str) -> None:
    """Write ``data`` to ``path`` atomically; an earlier file there is first moved into the folder
    ``history`` beside it as ``<stem>-<mtime>-<n>.json`` (results are kept, never overwritten)."""
    path = Path(path)
    if path.exists():
        folder = path.parent / history
        folder.mkdir(exist_ok=True)
        n = len(list(folder.iterdir()))
        while (dest := folder / f"{path.stem}-{int(path.stat().st_mtime)}-{n}{path.suffix}").exists():
            n += 1
        path.rename(dest)
    atomic_write_json(path, data)



def refuse_inputs_as_outputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike],
                             flag: str = "--out") -> None:
    """Refuse, before anything runs, an output that resolves (``realpath``: links, ``..``) to one of
    the command's inputs, whatever ``--force`` says: ``--force`` is for earlier outputs, never for
    inputs (docs/runs.md, "Inputs are never outputs")."""
    real = {os.path.realpath(p): Path(p) for p in inputs}
    for out in outputs:
        hit = real.get(os.path.realpath(out))
        if hit is not None:
            raise SegpromptError(f"the output '{out}' is the input '{hit}' itself; a command never writes over its "
                                 f"inputs, even with --force: choose a {flag} outside them")
