"""Each kind of bad input gets a clear message that names the file, key or value, and loses nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import run_cli, write_recipe

from segprompt.errors import SegpromptError
from segprompt.training.launch import train


def _first(root, kind="ann_dir", split="train"):
    return sorted((root / kind / split).glob("*.png"))[0]


def test_missing_dataset_root_names_the_prepare_command(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "nowhere")
    with pytest.raises(SegpromptError) as e:
        train(recipe, out=tmp_path / "run")
    assert f"`segprompt prepare synthetic --out {tmp_path / 'nowhere'}`" in str(e.value)


def test_label_values_outside_the_classes_name_file_and_values(data_copy, tmp_path):
    path = _first(data_copy)
    lbl = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    lbl[:2, :2] = 7
    lbl[-1, -1] = 200
    cv2.imwrite(str(path), lbl)
    recipe = write_recipe(tmp_path / "r.yaml", data_copy)
    with pytest.raises(SegpromptError) as e:
        train(recipe, ["schedule.iters=40", "data.batch_size=12"], out=tmp_path / "run")
    msg = str(e.value)
    assert str(path) in msg and "[7, 200]" in msg and "{0..3, 255}" in msg


def test_binary_mask_stored_as_0_255_is_explained(data_copy, tmp_path):
    path = _first(data_copy)
    lbl = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), np.where(lbl > 0, 254, 0).astype(np.uint8))
    recipe = write_recipe(tmp_path / "r.yaml", data_copy)
    with pytest.raises(SegpromptError, match="0/1, not 0/255"):
        train(recipe, ["schedule.iters=40", "data.batch_size=12"], out=tmp_path / "run")


def test_image_label_size_mismatch_names_both_files(data_copy, tmp_path):
    path = _first(data_copy)
    lbl = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), lbl[:50])
    recipe = write_recipe(tmp_path / "r.yaml", data_copy)
    with pytest.raises(SegpromptError) as e:
        train(recipe, ["schedule.iters=40", "data.batch_size=12"], out=tmp_path / "run")
    msg = str(e.value)
    assert str(path) in msg and str(_first(data_copy, "img_dir")) in msg and "64x64" in msg and "64x50" in msg


def test_corrupt_image_fails_by_name_or_is_skipped_and_counted(data_copy, tmp_path):
    bad = _first(data_copy, "img_dir")
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    recipe = write_recipe(tmp_path / "r.yaml", data_copy)
    with pytest.raises(SegpromptError) as e:
        train(recipe, ["schedule.iters=3", "data.batch_size=12"], out=tmp_path / "a")
    assert str(bad) in str(e.value) and "data.skip_bad_images" in str(e.value)

    bad_val = _first(data_copy, "img_dir", "val")
    bad_val.write_bytes(b"")
    run = train(recipe, ["schedule.iters=3", "data.batch_size=12", "data.skip_bad_images=true"], out=tmp_path / "b")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = [r for r in records if r.get("event") == "skipped_images"]
    assert summary and summary[0]["files"] == [str(bad)]
    final = json.loads((run / "eval.json").read_text())
    assert final["images"] == 6 and final["skipped_images"] == [str(bad_val)]  # evaluated once, never replaced


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, synthetic_root):
    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    run = tmp_path / "run"
    with pytest.raises(SegpromptError) as e:
        train(recipe, ["schedule.iters=30", "schedule.warmup_iters=0", "optimizer.lr=1e12", "checkpoint.interval=1",
                       "evaluation.interval=0"], out=run)
    msg = str(e.value)
    assert "non-finite loss at iteration" in msg and str(run / "checkpoints" / "last.pt") in msg
    failed_at = int(msg.split("non-finite loss at iteration ")[1].split()[0])
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["iteration"] == failed_at - 1 and f"(iteration {failed_at - 1})" in msg
    assert all(torch.isfinite(v.float()).all() for v in last["model"].values())
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-2]["event"] == "non_finite_loss" and events[-2]["iter"] == failed_at
    assert events[-1] == {"event": "end", "status": "diverged", "iter": failed_at - 1}
    last_line = (run / "train.log").read_text().splitlines()[-1]
    assert f"run ended: diverged after {failed_at - 1} iteration(s): non-finite loss at iteration {failed_at}" in last_line


def test_missing_and_mismatched_pretrained_weights(tmp_path, synthetic_root):
    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    missing = tmp_path / "weights" / "resnet18.pth"
    with pytest.raises(SegpromptError) as e:
        train(recipe, [f"model.pretrained={missing}"], out=tmp_path / "a")
    assert str(missing) in str(e.value) and "Put the resnet checkpoint file there" in str(e.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1), "stem.0.weight": torch.zeros(4, 3, 3, 3)}, wrong)
    with pytest.raises(SegpromptError, match=r"do not fit backbone 'resnet': \d+ missing keys .* 1 unexpected keys \['conv.weight'\]"):
        train(recipe, [f"model.pretrained={wrong}"], out=tmp_path / "b")


@pytest.mark.slow
def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    res = run_cli("train", str(tmp_path / "none.yaml"))
    assert res.returncode == 2
    assert "error:" in res.stderr and "none.yaml' does not exist" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_cli_error_from_a_data_worker_is_clean(data_copy, tmp_path):
    path = _first(data_copy)
    cv2.imwrite(str(path), np.full((64, 64), 9, np.uint8))
    recipe = write_recipe(tmp_path / "r.yaml", data_copy)
    res = run_cli("train", str(recipe), "--out", str(tmp_path / "run"), "--set", "runtime.num_workers=1",
                  "--set", "data.batch_size=12")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and str(path) in res.stderr.replace("\n", "")


def test_a_divergence_with_a_finite_loss_stops_the_run_and_saves_nothing_non_finite(tmp_path, synthetic_root):
    """lr 1e6 with the recipe's warm-up: the loss stays finite (it once reached 2e18) while weights
    overflow; the run used to end 'finished' with inf in best.pt."""
    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    run = tmp_path / "run"
    with pytest.raises(SegpromptError, match=r"diverged at iteration \d+: \d+ weight or statistics tensor\(s\) "
                                             r"hold inf or NaN after the step \(the loss was"):
        train(recipe, ["schedule.iters=20", "optimizer.lr=1e6", "checkpoint.interval=1", "evaluation.interval=0"],
              out=run)
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-2]["event"] == "non_finite_weights" and events[-1]["status"] == "diverged"
    for name in ("last.pt", "best.pt"):
        if (run / "checkpoints" / name).is_file():
            state = torch.load(run / "checkpoints" / name, weights_only=True)["model"]
            assert all(torch.isfinite(v.float()).all() for v in state.values())


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny 1-bit PNG that declares ``width`` x ``height`` pixels (its data stops early: only the
    header is ever read)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def test_the_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, synthetic_root, monkeypatch):
    from segprompt.data.dataset import BadImage, read_image
    from segprompt.data.pixel_limit import over_limit

    bomb = tmp_path / "in" / "bomb.png"
    bomb.parent.mkdir()
    bomb.write_bytes(bomb_png())
    assert "30000 x 30000 = 900,000,000 pixels, over the limit of 89,478,485" in over_limit(bomb.read_bytes())
    with pytest.raises(BadImage, match="over the limit of 89,478,485 .*SEGPROMPT_MAX_PIXELS"):
        read_image(bomb)
    monkeypatch.setenv("SEGPROMPT_MAX_PIXELS", "0")
    assert over_limit(bomb.read_bytes()) is None
    monkeypatch.setenv("SEGPROMPT_MAX_PIXELS", "1000")
    img = tmp_path / "in" / "small.png"
    cv2.imwrite(str(img), np.zeros((40, 30, 3), np.uint8))
    assert "40" in over_limit(img.read_bytes())  # 30 x 40 = 1,200 > 1,000
    monkeypatch.delenv("SEGPROMPT_MAX_PIXELS")
    # training stops at it, naming the file (one of the training images replaced by the bomb)
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    victim = sorted((data / "img_dir" / "train").iterdir())[0]
    victim.write_bytes(bomb_png())
    recipe = write_recipe(tmp_path / "r.yaml", data)
    with pytest.raises(SegpromptError, match=rf"{victim.name}.*over the limit"):
        train(recipe, ["schedule.iters=2", "runtime.num_workers=0"], out=tmp_path / "run")


def test_predict_skips_an_image_over_the_pixel_limit_and_exits_2_when_none_is_predicted(tmp_path, synthetic_root,
                                                                                         capsys):
    from segprompt.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    run = train(recipe, ["schedule.iters=1", "evaluation.interval=0"], out=tmp_path / "run")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "over the limit of 89,478,485" in err and "no image was predicted" in err
    assert "WARN" not in err  # OpenCV never speaks on stderr: files are read by Python, decoded from memory
    cv2.imwrite(str(tmp_path / "in" / "ok.png"), np.zeros((24, 24, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "out2"), "--strict"])
    assert e.value.code == 2 and "bomb.png" in capsys.readouterr().err
    main_ok = ["predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "out3")]
    with pytest.raises(SystemExit) as e:
        main(main_ok)
    assert e.value.code == 0  # one image predicted, one skipped
    assert (tmp_path / "out3" / "ok.png").is_file() and not (tmp_path / "out3" / "bomb.png").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), str(tmp_path / "loop"), "--out", str(tmp_path / "out4")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a symbolic link that leads nowhere" in err and len(err.strip().splitlines()) == 1


def test_inputs_are_never_outputs_whatever_force_says(tmp_path, synthetic_root, capsys):
    from segprompt.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    run = train(recipe, ["schedule.iters=1", "evaluation.interval=0"], out=tmp_path / "run")
    photo = tmp_path / "photos" / "a.png"
    photo.parent.mkdir()
    cv2.imwrite(str(photo), np.full((24, 24, 3), 90, np.uint8))
    before = photo.read_bytes()
    best = run / "checkpoints" / "best.pt"
    kept = best.read_bytes()
    linked = tmp_path / "link"
    linked.symlink_to(photo.parent)
    cases = [["predict", str(run), str(photo), "--out", str(photo.parent), "--format", "index", "--force"],
             ["predict", str(run), str(photo), "--out", str(linked), "--format", "index", "--force"],  # via a link
             ["export", str(run), "--format", "checkpoint", "--out", str(best), "--force"],
             ["export", str(run), "--format", "torchscript", "--out", str(best), "--force"]]
    for args in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "is the input" in err and "even with --force" in err, (args, err)
    assert photo.read_bytes() == before and best.read_bytes() == kept


def test_two_images_with_one_stem_are_refused_naming_both(tmp_path, synthetic_root, capsys):
    from segprompt.cli import main

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    first = sorted((data / "img_dir" / "val").iterdir())[0]
    twin = first.with_suffix(".jpg" if first.suffix != ".jpg" else ".png")
    cv2.imwrite(str(twin), cv2.imread(str(first)))
    recipe = write_recipe(tmp_path / "r.yaml", data)
    message = rf"'{first}' and '{twin}' share the stem '{first.stem}'|'{twin}' and '{first}' share the stem"
    with pytest.raises(SegpromptError, match=message):
        train(recipe, ["schedule.iters=1"], out=tmp_path / "run")
    run = train(write_recipe(tmp_path / "ok.yaml", synthetic_root), ["schedule.iters=1", "evaluation.interval=0"],
                out=tmp_path / "ok")
    for args in (["eval", str(recipe), "--checkpoint", str(run / "checkpoints" / "best.pt")],
                 ["prepare", "synthetic", "--check", "--out", str(data)]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and twin.name in err, (args, err)


def test_a_killed_writer_s_temporary_is_removed_by_the_next_command_writing_there(tmp_path, synthetic_root):
    """A dead process's temporary (a killed export left a 1.9 MB .onnx temporary forever) is removed
    by the next atomic write into its folder, whichever command makes it; live ones are kept."""
    import subprocess
    import sys

    from segprompt.io import atomic_write_bytes, temp_prefix
    from segprompt.serve.share import export_delta

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "exports"
    out.mkdir()
    stale = out / f"{temp_prefix(out / 'm.onnx', dead.pid)}0a1b2c3d.tmp"
    live = out / f"{temp_prefix(out / 'm.onnx')}0a1b2c3d.tmp"  # this process: alive
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"x")
    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    run = train(recipe, ["schedule.iters=1", "evaluation.interval=0"], out=tmp_path / "run")
    export_delta(run, out / "task.safetensors")
    assert not stale.exists() and live.exists() and (out / "task.safetensors").is_file()
    other = tmp_path / "other"
    other.mkdir()
    stale2 = other / f"{temp_prefix(other / 'eval.json', dead.pid)}ffff0000.tmp"
    stale2.write_bytes(b"")
    atomic_write_bytes(other / "x.json", b"{}")
    assert not stale2.exists()


def test_a_live_run_is_read_only_to_other_commands(tmp_path, synthetic_root, monkeypatch, capsys):
    from segprompt.cli import main
    from segprompt.evaluation.evaluate import evaluate_checkpoint
    from segprompt.runs.runlock import lock_run_dir

    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    run = train(recipe, ["schedule.iters=1", "evaluation.interval=0"], out=tmp_path / "run")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    monkeypatch.chdir(tmp_path)
    lock = lock_run_dir(run)  # as a trainer resuming it would hold it
    try:
        path, _ = evaluate_checkpoint(run)
        assert run not in path.parents and "eval-run" in str(path)  # evaluated beside it, not into it
        img = tmp_path / "a.png"
        cv2.imwrite(str(img), np.zeros((24, 24, 3), np.uint8))
        for args in (["predict", str(run), str(img), "--out", str(run / "preds")],
                     ["export", str(run), "--format", "delta", "--out", str(run / "task.safetensors")],
                     ["eval", str(run), "--save-preds", str(run / "preds")]):
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                main(args)
            err = capsys.readouterr().err
            assert e.value.code == 2 and "a running run is read-only to other commands" in err, (args, err)
    finally:
        lock.release()
    after = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert after == before  # nothing was written into it (the lock file aside, which training keeps)


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys):
    """ENOENT from creating an output (a folder under /proc) once ended in a traceback."""
    from segprompt.cli import main

    blocked = Path("/proc/segprompt-nope/tables") if Path("/proc/self").is_dir() else tmp_path / "f" / "x"
    if not blocked.parts[1] == "proc":
        (tmp_path / "f").write_text("a file where a folder is wanted")
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--table", "4", "--collect", "--results", str(tmp_path / "ab"), "--out", str(blocked)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and str(blocked) in err[0] and "Traceback" not in err[0]
    assert "ENOENT" in err[0] or "ENOTDIR" in err[0]
