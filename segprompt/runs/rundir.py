"""Run directories: config, environment, metrics, log and checkpoints of one run.

``results/<recipe>/<timestamp>/`` (or ``--out DIR``) holds ``config.yaml`` (the resolved recipe),
``env.json`` (versions, git commit, world size, seed), ``metrics.jsonl``, ``train.log`` and
``checkpoints/``. An existing run directory is never overwritten: a new run needs a new folder,
and only ``--resume`` continues an existing one. The one exception is a failed start (a run that
ended before its first iteration, e.g. interrupted during setup; a start refused with a user error
removes the folder it made instead): a new run may take its place, and its ``train.log`` keeps the
failed start's record above its own (docs/runs.md).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy
import torch
from rich.logging import RichHandler

from segprompt import __version__
from segprompt.errors import SegpromptError, os_problem
from segprompt.io import atomic_write_json, atomic_write_text, is_temporary
from segprompt.runs.runlock import LOCK

CONFIG = "config.yaml"
CKPT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
DEPLOYED = "deployed.pt"  # text-guided models: the best checkpoint with its text embeddings baked in


def default_run_dir(recipe: str | Path, results: str | Path = "results") -> Path:
    return Path(results) / Path(recipe).stem / time.strftime("%Y%m%d-%H%M%S")


def _records(metrics: Path) -> Iterator[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, skipping a line cut by a kill."""
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            yield rec


def _trained(metrics: Path) -> bool:
    """Whether ``metrics.jsonl`` records a training iteration or an evaluation."""
    return any("loss" in rec or "split" in rec for rec in _records(metrics))


def finished(run_dir: Path) -> bool:
    """Whether the run's last end record (``metrics.jsonl``, ``{"event": "end", ...}``) says it
    finished: what "finished" means everywhere (docs/runs.md), never the presence of ``eval.json``,
    which ``segprompt eval`` may write into an unfinished run."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        return False
    status = None
    for rec in _records(metrics):
        if rec.get("event") == "end":
            status = rec.get("status")
        elif rec.get("event") == "resume":
            status = None  # a resumed run is unfinished until it ends again
    return status == "finished"


def failed_start(path: Path) -> bool:
    """``path`` holds nothing, or only a run that ended before its first iteration: its config,
    environment record, log and lock, no checkpoint and no training record in ``metrics.jsonl``."""
    for p in path.iterdir():
        if is_temporary(p) or p.name in (CONFIG, "train.log", LOCK):
            continue
        if re.fullmatch(r"env(-resume-[\d-]+)?\.json", p.name):
            continue
        if p.name == CKPT_DIR and p.is_dir() and all(is_temporary(q) for q in p.iterdir()):
            continue
        if p.name == "metrics.jsonl" and p.is_file() and not _trained(p):
            continue
        return False
    return True


def check_new_run_dir(path: Path) -> None:
    """Refuse ``path`` for a new run unless it is free: absent, empty, or a failed start."""
    if path.exists() and not path.is_dir():
        raise SegpromptError(f"run directory '{path}' is a file, not a folder; choose another --out")
    if path.is_dir() and not failed_start(path):
        resume = (f", or continue that run with `segprompt train ... --out {path} --resume auto`"
                  if (path / CONFIG).is_file() else "")
        raise SegpromptError(f"run directory '{path}' already exists and is not empty; choose another --out{resume}")


def new_run_dir(path: Path) -> Path:
    """Create ``path`` for a new run; refuse a folder that holds anything but a failed start."""
    check_new_run_dir(path)
    try:
        (path / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SegpromptError(f"cannot create run directory {os_problem(e, path)}") from None
    return path


def find_latest_run(recipe: str | Path, results: str | Path = "results") -> Path | None:
    """The newest run of this recipe under ``results/`` that has a last checkpoint."""
    root = Path(results) / Path(recipe).stem
    runs = sorted((p for p in root.glob("*") if (p / CKPT_DIR / LAST).is_file()), key=lambda p: p.name)
    return runs[-1] if runs else None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(world_size: int, seed: int, device: torch.device) -> dict[str, Any]:
    env = {
        "segprompt": __version__, "git_commit": git_commit(), "python": sys.version.split()[0],
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": numpy.__version__, "opencv": cv2.__version__, "platform": platform.platform(),
        "hostname": socket.gethostname(), "argv": sys.argv, "world_size": world_size, "seed": seed,
        "device": str(device), "threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_run_files(run: Path, config_yaml: str, env: dict[str, Any]) -> None:
    atomic_write_text(run / CONFIG, config_yaml)
    name = "env.json"
    if (run / name).exists():  # a resumed run keeps the first environment record too
        name = f"env-resume-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(run / name, env)


class MetricsLog:
    """Append-only ``metrics.jsonl``; one JSON object per line, flushed at once."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


FILE_ONLY = {"file_only": True}  # `log.error(..., extra=FILE_ONLY)`: train.log only (the CLI prints its own line)


def setup_logging(run: Path | None, is_main: bool) -> logging.Logger:
    log = logging.getLogger("segprompt")
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if is_main:
        if sys.stdout.isatty():

            console = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
        else:  # a log file or a pipe: one line per record, never wrapped at 80 columns
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        console.addFilter(lambda record: not getattr(record, "file_only", False))
        log.addHandler(console)
        if run is not None:
            fh = logging.FileHandler(run / "train.log")
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(fh)
    return log
