"""Experiment tracking of a training run: ``runtime.loggers: [tensorboard, wandb, mlflow]`` (docs/watch.md).

Each logger receives what ``metrics.jsonl`` records, at the same iterations: ``train/<key>`` every
``runtime.log_interval`` and, after each evaluation, ``val/<metric>`` and ``val_IoU/<class>``.
TensorBoard and W&B also get the validation overlays (:mod:`.tensorboard`).

- **Through the real libraries**, optional extras (``segprompt[watch]`` for TensorBoard,
  ``segprompt[track]`` for W&B and MLflow). A logger named in the recipe whose library is missing
  stops the run before its first iteration, on every rank, with the ``pip install`` to run.
- **Only rank 0 logs**; the other ranks open nothing.
- **A resume continues the same tracked run.** The ids are kept in ``RUN/trackers.json`` (written
  atomically when a logger first opens): W&B is re-initialised with ``id=`` and ``resume="allow"``,
  MLflow logs to the same run id; steps are iterations, so the resumed curve continues where the
  checkpoint was.
- Where they log is the libraries' own business, set the usual way: ``WANDB_MODE=offline`` (files
  under ``RUN/wandb/``, ``wandb sync`` later), ``WANDB_ENTITY``; ``MLFLOW_TRACKING_URI`` (a server,
  ``sqlite:///mlflow.db``, or a file store). ``runtime.project`` names the W&B project and the
  MLflow experiment; the run is named after its folder.
"""

from __future__ import annotations

import importlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segprompt.config import Recipe
from segprompt.errors import SegpromptError
from segprompt.io import atomic_write_json
from segprompt.training.tensorboard import (
    OVERLAY_IMAGES,
    TensorBoardLog,
    overlay_images,
)

__all__ = ["TRACKERS_FILE", "Trackers"]

TRACKERS_FILE = "trackers.json"  # the tracked runs' ids, so a resume continues them


def _import(name: str, module: str) -> Any:
    # function-level imports: each library is an optional extra, loaded only when its logger is on
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SegpromptError(f"runtime.loggers names {name} but it cannot be imported ({e}); install it with "
                             f"`pip install 'segprompt[track]'`, or remove {name} from runtime.loggers") from None


def _numbers(record: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _eval_numbers(result: dict[str, Any]) -> dict[str, float]:
    """An evaluation as flat scalars: summary metrics, per-class IoU, per-category IoU."""
    out = {f"val/{k}": v for k, v in result.items() if isinstance(v, float)}
    out.update({f"val_IoU/{row['class']}": row["IoU"] for row in result.get("per_class", [])
                if row["IoU"] is not None})
    out.update({f"val_categoryIoU/{k}": v for k, v in (result.get("categoryIoU") or {}).items() if v is not None})
    return out


class _Ids:
    """``RUN/trackers.json``: each logger's id of this run, kept across resumes."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / TRACKERS_FILE
        try:
            self.ids = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except json.JSONDecodeError as e:
            raise SegpromptError(f"'{self.path}' is not valid JSON ({e}); it holds the ids of this run's W&B/MLflow "
                                 f"runs: restore it, or delete it to start new tracked runs") from None

    def get(self, key: str) -> Any:
        return self.ids.get(key)

    def set(self, key: str, value: Any) -> None:
        self.ids[key] = value
        atomic_write_json(self.path, self.ids)


class WandbLog:
    """A W&B run (``wandb.init``), opened at the first write."""

    def __init__(self, run_dir: Path, cfg: Recipe, ids: _Ids):
        self.wandb = _import("wandb", "wandb")
        self.run_dir, self.cfg, self.ids, self.run = Path(run_dir), cfg, ids, None

    def _open(self):
        if self.run is None:
            run_id = self.ids.get("wandb") or uuid.uuid4().hex[:12]
            self.run = self.wandb.init(project=self.cfg.runtime.project, id=run_id, resume="allow",
                                       name=self.run_dir.name, dir=str(self.run_dir), config=self.cfg.to_dict())
            self.ids.set("wandb", run_id)
        return self.run

    def log(self, step: int, values: dict[str, float], images: list[tuple[str, Any]] = ()) -> None:
        payload: dict[str, Any] = dict(values)
        payload.update({f"val_overlay/{stem}": self.wandb.Image(image) for stem, image in images})
        self._open().log(payload, step=step)

    def close(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
            self.run = None


_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in a metric or parameter name


class MlflowLog:
    """An MLflow run through :class:`mlflow.tracking.MlflowClient` (no global active run), opened at
    the first write; the recipe's keys become its parameters."""

    def __init__(self, run_dir: Path, cfg: Recipe, ids: _Ids):
        self.mlflow = _import("mlflow", "mlflow")
        self.run_dir, self.cfg, self.ids, self.run_id, self.client = Path(run_dir), cfg, ids, None, None

    def _open(self) -> str:
        if self.run_id is None:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            try:
                self.client = MlflowClient()
                self.run_id = self.ids.get("mlflow")
                if self.run_id is None:
                    exp = self.client.get_experiment_by_name(self.cfg.runtime.project)
                    exp_id = exp.experiment_id if exp else self.client.create_experiment(self.cfg.runtime.project)
                    self.run_id = self.client.create_run(exp_id, run_name=self.run_dir.name).info.run_id
                    params = [Param(_MLFLOW_KEY.sub("_", k), str(v)[:500]) for k, v in _flat(self.cfg.to_dict())]
                    for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
                        self.client.log_batch(self.run_id, params=params[i:i + 100])
                    self.ids.set("mlflow", self.run_id)
                else:
                    self.client.update_run(self.run_id, status="RUNNING")
            except self.mlflow.exceptions.MlflowException as e:
                first = str(e).strip().splitlines()[0]
                raise SegpromptError(f"MLflow could not open a run ({first}); point MLFLOW_TRACKING_URI at a "
                                     f"tracking server or a database (e.g. sqlite:///mlflow.db), or remove mlflow "
                                     f"from runtime.loggers") from None
        return self.run_id

    def log(self, step: int, values: dict[str, float], images: list[tuple[str, Any]] = ()) -> None:
        from mlflow.entities import Metric

        run_id = self._open()
        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


class Trackers:
    """Every logger ``runtime.loggers`` names (``runtime.tensorboard: true`` counts as naming
    tensorboard); the methods are no-ops where none is on or ``write`` is false (ranks other than 0).
    The libraries are imported on every rank, so all ranks stop together when one is missing."""

    def __init__(self, run_dir: Path, cfg: Recipe, *, write: bool, first_iter: int):
        names = list(dict.fromkeys([*(["tensorboard"] if cfg.runtime.tensorboard else []), *cfg.runtime.loggers]))
        self.cfg = cfg
        self.tensorboard = TensorBoardLog(run_dir, cfg, write=write, first_iter=first_iter,
                                          enabled="tensorboard" in names)
        ids = _Ids(run_dir)
        others = [cls(run_dir, cfg, ids) for name, cls in (("wandb", WandbLog), ("mlflow", MlflowLog))
                  if name in names]
        self.others = others if write else []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        status = ("FINISHED" if exc_type is None else
                  "KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")
        self.close(status)

    def scalars(self, step: int, record: dict[str, Any], prefix: str = "train") -> None:
        self.tensorboard.scalars(step, record, prefix)
        for log in self.others:
            log.log(step, _numbers(record, prefix))

    def evaluation(self, step: int, result: dict[str, Any], model: nn.Module, dataset: Any,
                   device: torch.device) -> None:
        images = []
        if (self.tensorboard.enabled or any(isinstance(t, WandbLog) for t in self.others)) \
                and getattr(dataset, "task", "segmentation") == "segmentation":
            images = overlay_images(model, dataset, self.cfg, device, OVERLAY_IMAGES)
        self.tensorboard.evaluation(step, result, images)
        for log in self.others:
            log.log(step, _eval_numbers(result), images if isinstance(log, WandbLog) else [])

    def close(self, status: str = "FINISHED") -> None:
        self.tensorboard.close()
        for log in self.others:
            log.close(status)
