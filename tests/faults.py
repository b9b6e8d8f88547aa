"""Fault injection for the tests: what users' machines do to runs, on purpose and on cue.

Disk faults (a full disk, a folder one may not write) are monkeypatches inside the test process.
Run as a script, this file is ``python -m segprompt`` with one process fault armed from the
environment (see :func:`start`); nothing in ``segprompt/`` knows about it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# process faults
#
# A fault is "send SIGNAL to myself when CALL runs for the NTH time" (counting only calls whose
# arguments mention MATCH), armed in the child through SEGPROMPT_TEST_FAULT. SIGKILL dies right
# there, before the call (e.g. with a checkpoint's temporary written but not yet renamed);
# SIGINT/SIGTERM reach the signal handler and the call goes ahead, as a signal from outside would.
# With ``error`` the call raises RuntimeError(error) instead: a bug, at a chosen place.

FAULT_ENV = "SEGPROMPT_TEST_FAULT"


def fault(call: str, sig: int = signal.SIGKILL, nth: int = 1, match: str | None = None, times: int = 1,
          rank: int | None = None, error: str | None = None) -> dict:
    """``call`` is ``module:attr`` (``os:replace``, ``segprompt.training.loop:evaluate``); ``times``
    sends the signal that often in a row (two SIGINTs: a second Ctrl-C); ``rank`` arms one DDP rank."""
    return {"call": call, "signal": int(sig), "nth": nth, "match": match, "times": times, "rank": rank,
            "error": error}


def _arm(spec: dict) -> None:
    if spec["rank"] is not None and int(os.environ.get("RANK", "0")) != spec["rank"]:
        return
    module, _, attr = spec["call"].partition(":")
    owner = importlib.import_module(module)
    *parents, leaf = attr.split(".")
    for name in parents:
        owner = getattr(owner, name)
    original = getattr(owner, leaf)
    count = 0

    def wrapper(*args, **kwargs):
        nonlocal count
        if spec["match"] is None or spec["match"] in " ".join(map(str, args)):
            count += 1
            if count == spec["nth"] and spec.get("error"):
                raise RuntimeError(spec["error"])
            if count == spec["nth"]:
                for _ in range(spec["times"]):
                    os.kill(os.getpid(), spec["signal"])
                    time.sleep(0.05)  # the handler runs before the next signal is sent
        return original(*args, **kwargs)

    setattr(owner, leaf, wrapper)


def env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200", **(extra or {})}


def start(*args: str, log: Path, fault_spec: dict | None = None, torchrun: int = 0) -> subprocess.Popen:
    """Start ``segprompt ARGS`` (under torchrun with N processes) with output to ``log``."""
    prefix = [sys.executable, __file__]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
                  "--master-port", str(port), __file__]
    extra = {FAULT_ENV: json.dumps(fault_spec)} if fault_spec else {}
    with open(log, "w") as f:
        return subprocess.Popen([*prefix, *args], env=env(extra), stdout=f, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """Kill ``proc`` (and torchrun's workers, in their own sessions) if it still runs at the end."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            for pid in _children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def run(*args: str, log: Path, fault_spec: dict | None = None, torchrun: int = 0, timeout: float = 300) -> int:
    """:func:`start` and wait; returns the exit status (negative: killed by that signal)."""
    proc = start(*args, log=log, fault_spec=fault_spec, torchrun=torchrun)
    with reaped(proc):
        return proc.wait(timeout)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 120) -> bool:
    """Poll ``condition`` until it holds (True), ``proc`` exits or time runs out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        time.sleep(0.01)
    return False


def iterations_logged(run_dir: Path) -> int:
    """The last training iteration in ``metrics.jsonl`` (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    done = 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            done = rec["iter"]
    return done


def signal_after(proc: subprocess.Popen, run_dir: Path, iteration: int, sig: int, pid: int | None = None,
                 children: bool = False) -> None:
    """Send ``sig`` to ``proc`` (or to ``pid``) once ``iteration`` iterations are logged; with
    ``children``, to its child processes first (DataLoader workers), as Slurm signals every process."""
    assert wait_for(lambda: iterations_logged(run_dir) >= iteration, proc), "the run ended before the signal"
    target = pid or proc.pid
    for child in _children(target) if children else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, sig)
    os.kill(target, sig)


def _children(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def child_with_rank(parent: int, rank: int, timeout: float = 60) -> int:
    """The PID of the torchrun worker of ``rank`` started by the agent ``parent``."""
    found: list[int] = []

    def look() -> bool:
        for pid in _children(parent):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                found.append(pid)
                return True
        return False

    assert wait_for(look, timeout=timeout), f"no rank-{rank} worker under PID {parent}"
    return found[0]


def dead_pid() -> int:
    """A PID that no process has any more (a child that exited)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


if __name__ == "__main__":
    if os.environ.get(FAULT_ENV):
        _arm(json.loads(os.environ[FAULT_ENV]))
    from segprompt.cli import main

    sys.argv[0] = "segprompt"
    main()
