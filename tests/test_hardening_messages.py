"""Hardening, part A: every user mistake or machine fault below ends in one `error:` line (exit 2)
that names the key, file or path and what to do, and loses nothing the user made."""

from __future__ import annotations

import json
import os
import stat

import cv2
import numpy as np
import pytest
import torch
from conftest import run_cli, write_recipe
from faults import fail_atomic_writes, forbid_dir

from segprompt.cli import main
from segprompt.errors import SegpromptError
from segprompt.training.launch import train


def cli(capsys, *args) -> tuple[int, str, str]:
    """``segprompt ARGS`` in this process: (exit code, stdout, stderr), as a pipe sees them."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """A finished 3-iteration run (recipe, run directory)."""
    tmp = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(tmp / "tiny.yaml", synthetic_root)
    return recipe, train(recipe, ["schedule.iters=3"], out=tmp / "run")


# ---- 1. values the schema or a constructor refuses ------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ("model.backbone.depth=19", ["model.backbone", "19", "[18, 34, 50, 101, 152]"]),
    ("data.batch_size=0", ["data.batch_size", ">= 1", "got 0"]),
    ("schedule.iters=-5", ["schedule.iters", ">= 1", "got -5"]),
    ("schedule.iters=0", ["schedule.iters", ">= 1"]),
    ("evaluation.interval=-1", ["evaluation.interval", ">= 0 (0 = only at the end)"]),
    ("checkpoint.interval=0", ["checkpoint.interval", ">= 1"]),
    ("optimizer.lr=-0.1", ["optimizer.lr", ">= 0"]),
    ("data.train.flip_prob=1.5", ["data.train.flip_prob", "in [0, 1]"]),
    ("evaluation.mode=slide", ["evaluation.crop_size", "evaluation.stride"]),
    ("model.decode_head.in_index=7", ["model.decode_head.in_index", "0..3"]),
])
def test_out_of_range_values_are_user_errors_naming_the_key(capsys, recipe, tmp_path, override, words):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", recipe, "--out", run, "--set", override)
    line = one_error_line(err)
    assert code == 2 and all(w in line for w in words), line
    assert not (run / "checkpoints" / "last.pt").exists()  # nothing was trained


def test_slide_stride_larger_than_the_window_is_refused(capsys, recipe, tmp_path):
    code, _, err = cli(capsys, "train", recipe, "--out", tmp_path / "run", "--set", "evaluation.mode=slide",
                       "--set", "evaluation.crop_size=[32,32]", "--set", "evaluation.stride=[40,16]")
    assert code == 2 and "evaluation.stride [40, 16] must not exceed evaluation.crop_size [32, 32]" in one_error_line(err)


def test_crop_larger_than_any_resized_image_is_refused(capsys, recipe, tmp_path):
    """Images are padded to the crop size (there is no separate pad size): a crop no resized image
    can fill would be mostly padding on every sample."""
    code, _, err = cli(capsys, "train", recipe, "--out", tmp_path / "run", "--set", "data.train.crop_size=[48,96]")
    line = one_error_line(err)  # scale [64, 64] x ratio up to 1.25: at most 80 pixels a side
    assert code == 2 and "data.train.crop_size [48, 96] is larger than any training image" in line, line
    assert "at most 80 pixels a side" in line and "lower crop_size or raise data.train.scale" in line
    assert not (tmp_path / "run").exists()
    code, _, err = cli(capsys, "train", recipe, "--out", tmp_path / "ok", "--set", "data.train.crop_size=[48,80]",
                       "--print-config")
    assert code in (0, None), err  # a crop the largest resize fills is fine, padded only when the draw is small


# ---- 2. --load-from that does not fit ------------------------------------------------------------

def test_load_from_a_foreign_file_is_refused_unless_partial(capsys, trained, tmp_path):
    recipe, run = trained
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, foreign)
    code, _, err = cli(capsys, "train", recipe, "--out", tmp_path / "a", "--load-from", foreign)
    line = one_error_line(err)
    assert code == 2 and f"'{foreign}' supplies 0 of this model's" in line and "fewer than 50%" in line
    assert "backbone.stem.0.weight" in line and "--load-from-partial" in line
    assert not (tmp_path / "a" / "checkpoints" / "last.pt").exists()
    code, _, err = cli(capsys, "train", recipe, "--out", tmp_path / "a2", "--load-from", foreign, "--load-from-partial")
    line = one_error_line(err)  # a partial load is allowed, an empty one is not
    assert code == 2 and "supplies none of this model's" in line and "drop --load-from" in line
    assert not (tmp_path / "a2" / "checkpoints" / "last.pt").exists()

    no_weights = tmp_path / "epoch.pt"
    torch.save({"epoch": 3, "arch": "resnet"}, no_weights)
    code, _, err = cli(capsys, "train", recipe, "--out", tmp_path / "b", "--load-from", no_weights)
    assert code == 2 and "holds no weights segprompt can read" in one_error_line(err)

    # one matching tensor: refused, then loaded on purpose with --load-from-partial
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    w = "decode_head.conv_seg.weight"
    head_only = tmp_path / "head.pt"
    torch.save({w: state[w] + 1.0}, head_only)
    code, _, err = cli(capsys, "train", recipe, "--out", tmp_path / "c", "--load-from", head_only)
    assert code == 2 and "supplies 1 of" in one_error_line(err)
    done = train(recipe, ["schedule.iters=1", "optimizer.lr=0.0", "schedule.min_lr=0.0"], out=tmp_path / "d",
                 load_from=head_only, load_from_partial=True)
    assert torch.equal(torch.load(done / "checkpoints" / "last.pt", weights_only=True)["model"][w], state[w] + 1.0)


def test_load_from_reads_an_mmsegmentation_checkpoint(trained, tmp_path):
    recipe, run = trained
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    mmseg = tmp_path / "iter_3.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": state}, mmseg)
    done = train(recipe, ["schedule.iters=1", "optimizer.lr=0.0", "schedule.min_lr=0.0"], out=tmp_path / "run",
                 load_from=mmseg)
    after = torch.load(done / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert torch.equal(after["backbone.stem.0.weight"], state["backbone.stem.0.weight"])


# ---- 3. checkpoint files that are not ours -------------------------------------------------------

def test_eval_of_a_foreign_or_garbage_checkpoint_is_one_line(capsys, trained, tmp_path):
    recipe, _ = trained
    foreign = tmp_path / "foreign.pt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(1)}}, foreign)
    code, _, err = cli(capsys, "eval", recipe, "--checkpoint", foreign)
    line = one_error_line(err)
    assert code == 2 and f"'{foreign}' is not a segprompt checkpoint" in line and "'model'" in line

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = cli(capsys, "eval", recipe, "--checkpoint", garbage)
    line = one_error_line(err)
    assert code == 2 and f"checkpoint '{garbage}' cannot be read" in line and "weights_only" not in line


def test_resume_from_a_checkpoint_without_training_state_is_refused(capsys, trained, tmp_path):
    recipe, run = trained
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    exported = tmp_path / "exp" / "checkpoints" / "last.pt"
    exported.parent.mkdir(parents=True)
    torch.save({"model": state["model"], "config": state["config"]}, exported)
    code, _, err = cli(capsys, "train", recipe, "--resume", exported)
    line = one_error_line(err)
    assert code == 2 and "cannot be resumed" in line and "--load-from" in line


# ---- 4. output locations -------------------------------------------------------------------------

def test_out_that_is_or_sits_under_a_file(capsys, recipe, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine\n")
    code, _, err = cli(capsys, "train", recipe, "--out", blocker)
    line = one_error_line(err)
    assert code == 2 and f"'{blocker}' is a file, not a folder" in line and "--resume" not in line
    code, _, err = cli(capsys, "train", recipe, "--out", blocker / "run")
    line = one_error_line(err)
    assert code == 2 and f"'{blocker}' is a file, not a folder (ENOTDIR)" in line and "--resume" not in line
    for sub in ("data", "data/deeper"):  # mkdir reports EEXIST or ENOTDIR: one message either way
        code, _, err = cli(capsys, "prepare", "synthetic", "--out", blocker / sub)
        line = one_error_line(err)
        assert code == 2 and f"'{blocker}' is a file, not a folder (ENOTDIR); choose another path" in line, line
    assert blocker.read_text() == "mine\n"


def test_out_in_a_folder_we_may_not_write(capsys, recipe, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    forbid_dir(monkeypatch, locked)
    code, _, err = cli(capsys, "train", recipe, "--out", locked / "missing" / "run")
    line = one_error_line(err)
    assert code == 2 and str(locked / "missing") in line and "(EACCES)" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(capsys, recipe, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code, _, err = cli(capsys, "train", recipe, "--out", locked / "run")
    finally:
        locked.chmod(stat.S_IRWXU)
    assert code == 2 and str(locked / "run") in one_error_line(err) and "(EACCES)" in err


def test_full_disk_at_the_start_names_the_file(capsys, recipe, tmp_path, monkeypatch):
    failed = fail_atomic_writes(monkeypatch, "config.yaml")
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", recipe, "--out", run)
    line = one_error_line(err)
    assert failed and code == 2 and f"'{run / 'config.yaml'}': No space left on device (ENOSPC)" in line
    assert not list(run.glob(".config.yaml.*.tmp"))


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(capsys, recipe, tmp_path, monkeypatch):
    failed = fail_atomic_writes(monkeypatch, "last.pt", after=1)  # the save at iteration 3 succeeds
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", recipe, "--out", run)
    line = one_error_line(err)
    assert failed == [str(run / "checkpoints" / "last.pt")] and code == 2
    assert "checkpoint of iteration 6 not saved" in line and "(ENOSPC)" in line
    assert "the previous 'last.pt' (iteration 3) is intact" in line
    assert f"continue with `segprompt train {recipe} --out {run} --resume auto`" in line  # a command to paste
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 3
    assert not list((run / "checkpoints").glob(".*.tmp"))


# ---- 5. truncated images -------------------------------------------------------------------------

def _cut_jpeg(data_copy, split="train"):
    """Replace the first image of ``split`` by a JPEG of it cut in the middle (OpenCV still decodes it)."""
    png = sorted((data_copy / "img_dir" / split).glob("*.png"))[0]
    data = cv2.imencode(".jpg", cv2.imread(str(png)))[1].tobytes()
    jpg = png.with_suffix(".jpg")
    jpg.write_bytes(data[: len(data) // 2])
    png.unlink()
    assert cv2.imread(str(jpg)) is not None
    return jpg


def test_truncated_jpeg_fails_by_name_or_is_skipped(capfd, data_copy, tmp_path):
    jpg = _cut_jpeg(data_copy)
    capfd.readouterr()  # the fixture's own decode printed libjpeg's warning
    recipe = write_recipe(tmp_path / "r.yaml", data_copy)
    with pytest.raises(SegpromptError) as e:
        train(recipe, ["schedule.iters=3", "data.batch_size=12"], out=tmp_path / "a")
    assert str(jpg) in str(e.value) and "truncated JPEG" in str(e.value) and "data.skip_bad_images" in str(e.value)
    run = train(recipe, ["schedule.iters=3", "data.batch_size=12", "data.skip_bad_images=true"], out=tmp_path / "b")
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["files"] for r in events if r.get("event") == "skipped_images"] == [[str(jpg)]]
    assert "Premature end of JPEG" not in capfd.readouterr().err  # checked before libjpeg decodes it


def test_prepare_check_and_conversion_find_truncated_images(capfd, data_copy):
    from segprompt.data.prepare.labels import decode_image

    jpg = _cut_jpeg(data_copy, "val")
    capfd.readouterr()
    code, _, err = cli(capfd, "prepare", "synthetic", "--check", "--out", data_copy)
    assert code == 2 and f"image '{jpg}' is cut short (truncated JPEG" in err
    assert "Premature end of JPEG" not in err and "--src" not in err and "--force" in err
    whole = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
    assert decode_image(whole, "a.jpg").shape == (16, 16, 3)
    with pytest.raises(SegpromptError, match=r"'x.jpg' in 'src.zip' is not a readable image \(truncated JPEG"):
        decode_image(whole[:-40], "'x.jpg' in 'src.zip'")


# ---- 10. file modes ------------------------------------------------------------------------------

def test_written_files_respect_the_umask(trained, tmp_path):
    from segprompt.io import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640
    _, run = trained  # written under the test process's umask, like its train.log
    log_mode = stat.S_IMODE((run / "train.log").stat().st_mode)
    for name in ("config.yaml", "env.json", "eval.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == log_mode, name


# ---- 11. one line per error, whatever the width ----------------------------------------------------

def test_recipe_errors_are_one_line_and_name_the_file(capsys, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "recipe-that-does-not-exist.yaml"
    code, _, err = cli(capsys, "train", deep)
    assert code == 2 and f"recipe '{deep}' does not exist" in one_error_line(err)

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: {name: resnet\n  decode_head: x\n")
    code, _, err = cli(capsys, "train", bad)
    line = one_error_line(err)
    assert code == 2 and f"recipe '{bad}' is not valid YAML at line 3, column" in line

    child = tmp_path / "child.yaml"
    child.write_text("base: ../nowhere/base.yaml\n")
    code, _, err = cli(capsys, "train", child)
    line = one_error_line(err)
    assert code == 2 and f"{child}: base '../nowhere/base.yaml'" in line  # the recipe that refers to it
    assert f"recipe '{tmp_path / '../nowhere/base.yaml'}' does not exist" in line

    code, _, err = cli(capsys, "train", tmp_path)
    assert code == 2 and f"recipe '{tmp_path}' is a directory" in one_error_line(err)


def test_resume_auto_without_a_run_says_it_starts_one(capsys, recipe, tmp_path):
    code, out, _ = cli(capsys, "train", recipe, "--out", tmp_path / "new", "--resume", "auto",
                       "--set", "schedule.iters=1")
    assert code == 0 and f"--resume auto: no run with a checkpoint in '{tmp_path / 'new'}'; starting a new run" in out


@pytest.mark.slow
def test_off_a_terminal_errors_and_the_summary_are_whole_lines(recipe, tmp_path):
    run = tmp_path / ("long-folder-name-" * 5) / "run"
    res = run_cli("train", str(recipe), "--out", str(run), "--set", "schedule.iters=2", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    summary = [x for x in res.stdout.splitlines() if "done: 2 iterations" in x]
    assert len(summary) == 1 and f"in '{run}'; best mIoU" in summary[0] and "{'metric'" not in res.stdout
    res = run_cli("train", str(recipe), "--out", str(run), env={"COLUMNS": "80"})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and f"'{run}' already exists" in res.stderr


# ---- 12. small truths ----------------------------------------------------------------------------

def test_eval_says_which_checkpoint_and_where_predictions_went(capsys, trained, tmp_path):
    _, run = trained
    preds = tmp_path / "preds"
    code, out, _ = cli(capsys, "eval", run, "--checkpoint", "last", "--save-preds", preds)
    assert code == 0
    assert f"checkpoint {run / 'checkpoints' / 'last.pt'} (iteration 3)" in out
    assert "wrote 7 predictions" in out and str(preds) in out and len(list(preds.glob("*_overlay.png"))) == 7


def test_second_identical_prepare_says_already_prepared(capsys, tmp_path):
    args = ("prepare", "synthetic", "--out", tmp_path / "d", "--image-size", "32", "--train", "2", "--val", "1",
            "--test", "0", "--num-classes", "3")
    code, out, _ = cli(capsys, *args)
    assert code == 0 and out.startswith("prepared synthetic")
    code, out, _ = cli(capsys, *args)
    assert code == 0 and out.startswith("already prepared synthetic") and "nothing written" in out


def test_flags_show_no_value_type_in_help(capsys):
    for command in ("train", "eval", "prepare"):
        code, out, _ = cli(capsys, command, "--help")
        assert code == 0 and "<bool>" not in out, out
    assert "<path>" in cli(capsys, "train", "--help")[1]  # options that take a value keep their type


def test_non_finite_loss_without_a_checkpoint_reads_as_a_sentence(tmp_path, synthetic_root):
    recipe = write_recipe(tmp_path / "r.yaml", synthetic_root)
    with pytest.raises(SegpromptError) as e:
        train(recipe, ["schedule.iters=30", "schedule.warmup_iters=0", "optimizer.lr=1e12",
                       "checkpoint.interval=1000", "evaluation.interval=0"], out=tmp_path / "run")
    assert "No checkpoint was saved before it." in str(e.value) and "is none" not in str(e.value)


def test_shell_completion_completes_shipped_recipe_names():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from segprompt.cli.app import complete_recipe

    names = complete_recipe("")
    assert "smoke" in names and "spm/ade20k_r101_spm" in names
    assert not any(n.startswith(("_base/", "tables/")) for n in names)
    script = Path(sys.executable).with_name("segprompt")  # the console script `pip install` writes
    if not script.is_file():
        pytest.skip("segprompt is not installed as a console script in this environment")
    env = {**os.environ, "_SEGPROMPT_COMPLETE": "complete_bash", "COMP_WORDS": "segprompt train spm/ade20k_r101_si",
           "COMP_CWORD": "2"}
    out = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["spm/ade20k_r101_side"]


def test_off_a_terminal_tables_print_whole_rows():
    from conftest import run_cli

    r = run_cli("ablate", "--list", env={"COLUMNS": ""})  # a pipe with no COLUMNS: rich would use 80
    rows = [line for line in r.stdout.splitlines() if line.startswith("│")]
    assert r.returncode == 0 and len(rows) == 19, r.stdout
    assert all(line.startswith(("│ spm ", "│ stdc ")) for line in rows)  # no cell wrapped onto another line


def test_usage_lines_name_their_arguments_and_every_help_ends_with_examples():
    from typer.testing import CliRunner

    from segprompt.cli import app
    from segprompt.cli.app import EXAMPLES

    wanted = {"prepare": "DATASET", "train": "RECIPE", "eval": "RUN", "predict": "RUN [IMAGE]...", "export": "RUN",
              "bench": "RECIPE|RUN|ONNX", "count-params": "[RECIPE]", "plot": "RUN...", "demo": "", "ablate": "",
              "browse": "RECIPE"}
    assert set(wanted) == set(EXAMPLES)
    for command, args in wanted.items():
        res = CliRunner().invoke(app, [command, "--help"], prog_name="segprompt", env={"COLUMNS": "300"})
        assert res.exit_code == 0, res.output
        usage = next(line for line in res.output.splitlines() if "Usage:" in line).split("Usage:")[1].strip()
        assert usage == f"segprompt {command} [OPTIONS] {args}".strip(), usage
        tail = res.output[res.output.index("Examples:"):]
        examples = [line.strip() for line in tail.splitlines()[1:] if line.strip()]
        assert examples and all(line.startswith(f"segprompt {command}") for line in examples), tail
