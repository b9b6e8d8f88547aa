"""Read-only inputs and outputs, tested without privileges: as root (CI's user) every permission is
ignored, so the commands run under ``setpriv`` without the capabilities that bypass file
permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER); as any other user, as they are."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_recipe

pytestmark = pytest.mark.slow

DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): permissions cannot be tested")
    return DROP


def segprompt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([*unprivileged(), sys.executable, "-m", "segprompt", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def writable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_read_only_dataset_run_and_out(tmp_path, synthetic_root):
    probe = tmp_path / "probe"
    probe.mkdir()
    read_only(probe)
    denied = subprocess.run([*unprivileged(), sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"],
                            capture_output=True, text=True)
    assert denied.returncode != 0 and "PermissionError" in denied.stderr  # the test means something
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    read_only(data)
    before = tree(data)
    recipe = write_recipe(tmp_path / "spm.yaml", data, tuning={"name": "spm", "stages": [1, 2]},
                          schedule={"iters": 2, "warmup_iters": 0})
    try:
        # a read-only dataset trains (SPM computes its class prior into the user cache, not the data)
        res = segprompt("train", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        assert tree(data) == before
        # a read-only run: predicting from it works; evaluating into it is one line naming the file
        run = tmp_path / "run"
        read_only(run)
        img = next((data / "img_dir" / "val").iterdir())
        res = segprompt("predict", str(run), str(img), "--out", str(tmp_path / "preds"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        res = segprompt("eval", str(run), cwd=tmp_path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "EACCES" in lines[0] and str(run) in lines[0], res.stderr
        # a read-only --out: one line naming it
        out = tmp_path / "ro_out"
        out.mkdir()
        read_only(out)
        res = segprompt("predict", str(run), str(img), "--out", str(out), cwd=tmp_path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and "EACCES" in lines[-1] and str(out) in lines[-1], res.stderr
        assert "Traceback" not in res.stderr
    finally:
        for p in (data, tmp_path / "run", tmp_path / "ro_out", probe):
            if p.exists():
                writable(p)
