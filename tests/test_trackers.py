"""Experiment tracking (runtime.loggers, docs/watch.md): W&B in offline mode and MLflow's file store,
read back; a resume continues the same tracked runs; only rank 0 logs."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import write_recipe

from segprompt.errors import SegpromptError
from segprompt.training.launch import train

wandb = pytest.importorskip("wandb", reason="the track extra (W&B)")
mlflow = pytest.importorskip("mlflow", reason="the track extra (MLflow)")

LOGGERS = ["runtime.loggers=[wandb,mlflow]", "checkpoint.keep=3", "runtime.project=tiny"]


@pytest.fixture()
def offline(tmp_path, monkeypatch) -> str:
    """W&B offline, MLflow in a file store under tmp_path (nothing leaves the machine)."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database unless told
    return uri


def wandb_history(offline_dir: Path) -> list[dict]:
    """The history records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then
    32 KiB blocks of records (CRC 4 bytes, length 2, type 1: full, first, middle, last), each a
    protobuf ``Record``, W&B's documented transaction log."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(offline_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                records.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                for i in rec.history.item})
        elif kind == 0:
            break
    return records


def test_wandb_offline_and_mlflow_file_store_read_back_and_resume_continues(recipe, tmp_path, offline):
    from mlflow.tracking import MlflowClient

    run = train(recipe, LOGGERS, out=tmp_path / "run")
    ids = json.loads((run / "trackers.json").read_text())
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["iter"]: r["loss"] for r in jsonl if "loss" in r}
    miou = {r["iter"]: r["mIoU"] for r in jsonl if "mIoU" in r}

    client = MlflowClient(tracking_uri=offline)
    mrun = client.get_run(ids["mlflow"])
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "run"
    assert client.get_experiment(mrun.info.experiment_id).name == "tiny"
    assert mrun.data.params["optimizer.lr"] == "0.02" and mrun.data.params["runtime.loggers"] == "['wandb', 'mlflow']"
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "train/loss")} == pytest.approx(losses)
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "val/mIoU")} == pytest.approx(miou)
    assert len(client.get_metric_history(ids["mlflow"], "val_IoU/background")) == 2

    (first,) = (run / "wandb").glob(f"offline-run-*-{ids['wandb']}")
    hist = wandb_history(first)
    assert {h["_step"]: h["train/loss"] for h in hist if "train/loss" in h} == pytest.approx(losses)
    assert {h["_step"]: h["val/mIoU"] for h in hist if "val/mIoU" in h} == pytest.approx(miou)
    images = [h["val_overlay/00000/path"] for h in hist if "val_overlay/00000/path" in h]  # after each evaluation
    assert len(images) == 2 and all((first / "files" / p).is_file() for p in images)

    # as if the process had died after iteration 6 and its last checkpoint were iteration 3's
    train(recipe, LOGGERS, resume=str(run / "checkpoints" / "iter_0000003.pt"))
    assert json.loads((run / "trackers.json").read_text()) == ids  # the same tracked runs
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    assert len(client.search_runs([mrun.info.experiment_id])) == 1
    assert sorted(m.step for m in client.get_metric_history(ids["mlflow"], "train/loss")) == [1, 2, 3, 4, 4, 5, 5, 6, 6]
    second = [d for d in (run / "wandb").glob(f"offline-run-*-{ids['wandb']}") if d != first]
    assert len(second) == 1  # W&B's offline mode writes each start apart; `wandb sync` joins them by id
    assert [h["_step"] for h in wandb_history(second[0]) if "train/loss" in h] == [4, 5, 6]


def test_unknown_or_missing_logger_stops_before_the_first_iteration(recipe, tmp_path, monkeypatch, offline):
    import sys

    with pytest.raises(SegpromptError, match="runtime.loggers"):
        train(recipe, ["runtime.loggers=[comet]"], out=tmp_path / "a")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    with pytest.raises(SegpromptError, match=r"runtime.loggers names mlflow .*pip install 'segprompt\[track\]'"):
        train(recipe, ["runtime.loggers=[mlflow]"], out=tmp_path / "b")
    assert not (tmp_path / "b").exists()  # a refused start leaves nothing


def test_mlflow_without_a_usable_store_is_one_clear_error(recipe, tmp_path, monkeypatch, offline):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # MLflow 3 then refuses the file store
    with pytest.raises(SegpromptError, match="MLflow could not open a run .*MLFLOW_TRACKING_URI"):
        train(recipe, ["runtime.loggers=[mlflow]"], out=tmp_path / "run")


@pytest.mark.slow
def test_only_rank_0_logs_under_ddp(tmp_path, synthetic_root, offline):
    from conftest import run_cli
    from mlflow.tracking import MlflowClient

    recipe = write_recipe(tmp_path / "tiny.yaml", synthetic_root)
    res = run_cli("train", str(recipe), "--out", str(tmp_path / "run"), "--set", "runtime.loggers=[mlflow]",
                  torchrun=2)
    assert res.returncode == 0, res.stdout + res.stderr
    client = MlflowClient(tracking_uri=offline)
    (exp,) = [e for e in client.search_experiments() if e.name == "segprompt"]
    (only,) = client.search_runs([exp.experiment_id])
    assert sorted(m.step for m in client.get_metric_history(only.info.run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
    shutil.rmtree(tmp_path / "run")
