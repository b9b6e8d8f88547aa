"""Shared fixtures: a tiny prepared synthetic dataset and a tiny recipe, written to tmp folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE = {
    "model": {
        "backbone": {"name": "resnet", "depth": 18, "base_channels": 8, "strides": [1, 2, 2, 1],
                     "dilations": [1, 1, 1, 2]},
        "decode_head": {"name": "fcn", "channels": 16, "num_convs": 1, "dropout": 0.1},
        "aux_heads": [{"name": "fcn", "channels": 8, "num_convs": 1, "concat_input": False, "in_index": 2,
                       "loss_weight": 0.4}],
    },
    "data": {"root": "SET_BY_FIXTURE", "batch_size": 4,
             "train": {"scale": [64, 64], "ratio_range": [0.75, 1.25], "crop_size": [48, 48]},
             "test": {"scale": [64, 64]}},
    "optimizer": {"name": "sgd", "lr": 0.02},
    "schedule": {"iters": 6, "warmup_iters": 2},
    "evaluation": {"interval": 3},
    "checkpoint": {"interval": 3},
    "runtime": {"seed": 0, "device": "cpu", "num_workers": 0, "log_interval": 1},
}


@pytest.fixture(scope="session", autouse=True)
def private_user_cache(tmp_path_factory):
    """Training caches class priors in the user's cache folder: the tests use one of their own,
    under pytest's temporary folders (subprocesses inherit the variable)."""
    if "SEGPROMPT_CACHE_DIR" not in os.environ:
        os.environ["SEGPROMPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from segprompt.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(root, seed=0, num_classes=4, image_size=(64, 64), counts={"train": 12, "val": 7, "test": 2})
    return root


@pytest.fixture()
def data_copy(synthetic_root, tmp_path) -> Path:
    """A private copy of the dataset that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(synthetic_root, dst)
    return dst


def write_recipe(path: Path, root: Path, **sections) -> Path:
    import copy

    d = copy.deepcopy(TINY_RECIPE)
    d["data"]["root"] = str(root)
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    path.write_text(yaml.safe_dump(d))
    return path


def recipe_from_dict(d: dict, folder: Path):
    """``d`` loaded and validated as a recipe, the way the CLI reads one (from ``folder/recipe.yaml``)."""
    from segprompt.config import load_recipe

    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_recipe(path)


@pytest.fixture()
def recipe(tmp_path, synthetic_root) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", synthetic_root)


def run_cli(*args: str, env: dict | None = None, timeout: int = 300, cwd: Path | None = None,
            torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run ``python -m segprompt ARGS`` (or under torchrun with N processes) in a subprocess."""
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
         "COLUMNS": "200", **(env or {})}
    prefix = [sys.executable, "-m", "segprompt"]
    if torchrun:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
                  "--master-port", str(_free_port()), "-m", "segprompt"]
    return subprocess.run([*prefix, *args], env=e, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
