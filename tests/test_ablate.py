"""`segprompt ablate`: config hashing, plans, skipping and resuming, collection, exports, Slurm via submitit."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli, write_recipe

from segprompt.config import dump_recipe, load_recipe, shipped_name, shipped_recipes
from segprompt.errors import SegpromptError
from segprompt.experiments import ablate as ab
from segprompt.experiments.tables import load_table

TINY = {"schedule": {"iters": 6, "warmup_iters": 2}, "checkpoint": {"interval": 3, "keep": 2},
        "runtime": {"seed": 0, "device": "cpu", "num_workers": 0, "log_interval": 1, "deterministic": True}}


def tiny_recipe(tmp: Path, root: Path, name: str = "tiny.yaml", **sections) -> Path:
    return write_recipe(tmp / name, root, **{**TINY, **sections})


def write_table(tmp: Path, name: str = "t.yaml", **fields) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({"paper": "test", "table": "1", "title": "tiny", **fields}, sort_keys=False))
    return path


@pytest.fixture()
def table(tmp_path, synthetic_root):
    """Two rows (full / head tuning); mIoU over seeds 0 and 1; background Dice of the seed-0 run."""
    recipe = str(tiny_recipe(tmp_path, synthetic_root))
    return load_table(write_table(
        tmp_path,
        columns=[{"name": "Head", "params": "head"},
                 {"name": "mIoU", "metric": "mIoU", "seeds": {"key": "runtime.seed", "values": [0, 1]}},
                 {"name": "Dice bg", "metric": "Dice.{key}"}],
        rows=[{"name": "full", "key": "background", "recipe": recipe, "paper": [0.01, "50.0±1.0", 90.0]},
              {"name": "head", "key": "background", "recipe": recipe, "set": ["tuning.name=head"],
               "paper": [0.01, 40.0, None]}]))


def test_config_hash_follows_the_resolved_config(tmp_path, synthetic_root):
    a = tiny_recipe(tmp_path, synthetic_root)
    # the same recipe with every mapping's keys in reverse order
    d = yaml.safe_load(a.read_text())

    def rev(x):
        return {k: rev(x[k]) for k in reversed(list(x))} if isinstance(x, dict) else x

    b = tmp_path / "reordered.yaml"
    b.write_text(yaml.safe_dump(rev(d), sort_keys=False))
    assert b.read_text() != a.read_text()
    h = ab.config_hash(load_recipe(a))
    assert ab.config_hash(load_recipe(b)) == h
    assert ab.config_hash(load_recipe(a, ["optimizer.lr=0.02"])) == h  # the recipe's own value
    assert ab.config_hash(load_recipe(a, ["optimizer.lr=0.03"])) != h
    assert ab.config_hash(load_recipe(a, ["tuning.name=head"])) != h
    # worker count and log interval change no result: machines with other settings share runs
    assert ab.config_hash(load_recipe(a, ["runtime.num_workers=3", "runtime.log_interval=5"])) == h
    # a run initialised from another run is a different run
    assert ab.config_hash(load_recipe(a), load_from="abc") != h


def test_plan_commands_name_shipped_recipes_and_relative_run_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: the commands must still run from here
    t, = ab.select_tables("spm", table="4")
    plan = ab.build_plan(t, rows=["1"])
    _, commands = ab.render_plan(plan)
    run = plan.runs[0]
    cmd = ab.command(run)
    assert cmd[:3] == ["segprompt", "train", shipped_name(run.recipe)] and cmd[2].startswith("spm/")
    assert cmd[cmd.index("--out") + 1] == str(Path("results/ablate/spm_table4") / run.dir.name)
    assert all(str(shipped_recipes()) not in c for c in commands)  # no absolute checkout or site-packages path
    assert load_recipe(cmd[2], run.overrides) == run.cfg  # the printed name resolves to the planned recipe


def test_plan_names_missing_inputs_and_the_size_of_the_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ or pretrained/ here
    t, = ab.select_tables("spm", table="4")
    plan = ab.build_plan(t)
    _, lines = ab.render_plan(plan)
    iters = sum(r.cfg.schedule.iters for r in plan.runs)
    assert lines[0] == (f"# to do: {len(plan.runs)} run(s), {iters:,} training iterations in all "
                        f"({sum(r.cfg.schedule.iters * r.cfg.data.batch_size for r in plan.runs):,} images read)")
    missing = [line for line in lines if line.startswith("# missing: ")]
    assert any("data.root 'data/ade20k': prepare it with `segprompt prepare ade20k" in m for m in missing)
    weights = [m for m in missing if "model.pretrained 'pretrained/resnet101_v1c.pth'" in m]
    assert len(weights) == 1 and f"needed by {len(plan.runs)} run(s)" in weights[0]  # one line per missing file
    for d in ("data/ade20k", "data/vaihingen", "data/chase_db1"):
        Path(d).mkdir(parents=True)
    Path("pretrained").mkdir()
    Path("pretrained/resnet101_v1c.pth").write_bytes(b"")
    _, lines = ab.render_plan(ab.build_plan(t))
    assert lines[1] == "# inputs: every dataset and weights file the runs need is in place"


def test_an_eval_json_in_an_unfinished_run_does_not_make_it_done(tmp_path, synthetic_root):
    """`eval` may write eval.json into an interrupted run: finished is what the end record says."""
    recipe = str(tiny_recipe(tmp_path, synthetic_root))
    t = load_table(write_table(tmp_path, columns=[{"name": "mIoU", "metric": "mIoU"}],
                               rows=[{"name": "a", "recipe": recipe, "paper": [1.0]}]))
    plan = ab.build_plan(t, root=tmp_path / "ab")
    run = plan.runs[0]
    _fake_run(run, {"mIoU": 5.0})
    (run.dir / "metrics.jsonl").write_text(json.dumps({"iter": 3, "loss": 1.0}) + "\n"
                                           + json.dumps({"event": "end", "status": "interrupted", "iter": 3}) + "\n")
    assert ab.build_plan(t, root=tmp_path / "ab").runs[0].state != "done"
    with (run.dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "resume", "iter": 3}) + "\n" + json.dumps({"iter": 6, "loss": 0.5}) + "\n"
                + json.dumps({"event": "end", "status": "finished", "iter": 6}) + "\n")
    assert ab.build_plan(t, root=tmp_path / "ab").runs[0].state == "done"


def test_plan_names_runs_by_hash_and_prints_commands(table, tmp_path):
    plan = ab.build_plan(table, root=tmp_path / "ab")
    # full: seeds 0 and 1 (the Dice column reads the seed-0 run), head: the same
    assert len(plan.runs) == 4 and {r.state for r in plan.runs} == {"missing"}
    again = ab.build_plan(table, root=tmp_path / "ab")
    assert [r.dir for r in again.runs] == [r.dir for r in plan.runs]
    assert len({r.dir for r in plan.runs}) == 4
    assert all(r.dir.parent == tmp_path / "ab" / "test_table1" and r.dir.name.endswith(r.hash[:12]) for r in plan.runs)
    full0 = plan.cells[1].runs[0]
    assert plan.cells[2].runs == [full0]  # Dice bg of row 'full' reads the mIoU seed-0 run
    assert plan.cells[1].runs[1].label == "tiny-seed1"
    _, commands = ab.render_plan(plan)
    text = "\n".join(commands)
    assert "--set runtime.seed=1" in text and "--set tuning.name=head" in text
    assert f"--out {full0.dir}" in text and "--resume" not in text
    tr = ab.command(full0, "torchrun", 4)
    assert tr[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m"]
    head_only = ab.build_plan(table, root=tmp_path / "ab", rows=["head"])
    assert {r.label for r in head_only.runs} == {r.label for r in plan.runs[2:]}
    with pytest.raises(SegpromptError, match="--rows: \\['nope'\\] not among the rows"):
        ab.build_plan(table, root=tmp_path / "ab", rows=["nope"])


def test_run_skips_finished_runs_and_resumes_interrupted_ones(table, tmp_path):
    root = tmp_path / "ab"
    plan = ab.build_plan(table, root=root, rows=["full"])
    report = ab.run_plan(plan, echo=lambda m: None)
    assert not report.failed and len(report.launched) == 2 and all(r.done for r in plan.runs)
    first = {r.dir: json.loads((r.dir / "eval.json").read_text()) for r in plan.runs}
    assert first[plan.runs[0].dir]["mIoU"] != first[plan.runs[1].dir]["mIoU"]  # two seeds, two results
    logs = sorted((root / "test_table1" / "_logs").iterdir())
    assert len(logs) == 2 and "iter 6/6" in logs[0].read_text()  # training output went to the logs

    # re-running skips both: nothing is touched
    mtimes = {r.dir: (r.dir / "eval.json").stat().st_mtime_ns for r in plan.runs}
    plan = ab.build_plan(table, root=root, rows=["full"])
    assert [r.state for r in plan.runs] == ["done", "done"]
    report = ab.run_plan(plan, echo=lambda m: None)
    assert report.launched == [] and len(report.skipped) == 2
    assert {r.dir: (r.dir / "eval.json").stat().st_mtime_ns for r in plan.runs} == mtimes

    # a run killed after its iteration-3 checkpoint: last.pt is that checkpoint, no eval.json
    run = plan.runs[1]
    ckpts = run.dir / "checkpoints"
    (run.dir / "eval.json").unlink()
    shutil.copyfile(ckpts / "iter_0000003.pt", ckpts / "last.pt")
    plan = ab.build_plan(table, root=root, rows=["full"])
    assert [r.state for r in plan.runs] == ["done", "interrupted"]
    assert "--resume auto" in " ".join(ab.command(plan.runs[1]))
    report = ab.run_plan(plan, echo=lambda m: None)
    assert [r.dir for r in report.launched] == [run.dir] and plan.runs[1].done
    events = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in events if e.get("event") == "resume"] == [3]
    resumed = json.loads((run.dir / "eval.json").read_text())
    assert resumed["iter"] == 6 and resumed["mIoU"] == first[run.dir]["mIoU"]  # deterministic CPU: same result

    # a directory with the cell's name but another config is never reused
    other = load_recipe(run.dir / "config.yaml", ["optimizer.lr=0.5"])
    (run.dir / "config.yaml").write_text(dump_recipe(other))
    with pytest.raises(SegpromptError, match="is not the config of the cell"):
        ab.build_plan(table, root=root, rows=["full"])


def test_a_cell_running_elsewhere_is_not_run_twice(table, tmp_path):
    from segprompt.runs import runlock

    plan = ab.build_plan(table, root=tmp_path / "ab", rows=["head"], seeds=1)
    run = plan.runs[0]
    held = runlock.lock_run_dir(run.dir)  # as another `ablate` (or `train`) running this cell holds it
    try:
        assert ab.build_plan(table, root=tmp_path / "ab", rows=["head"], seeds=1).runs[0].state == "missing"
        report = ab.run_plan(plan, echo=lambda m: None)
    finally:
        held.release()
    assert report.launched == [] and not report.failed
    [(waiting, why)] = report.waiting
    assert waiting is run and why.startswith(f"running in another process (PID {os.getpid()} on host ")
    assert sorted(p.name for p in run.dir.iterdir()) == [".lock"]  # nothing written by a second writer
    report = ab.run_plan(plan, echo=lambda m: None)  # once it is free, the cell runs
    assert [r.dir for r in report.launched] == [run.dir] and run.done


def test_finished_run_of_another_table_is_reused(table, tmp_path):
    root = tmp_path / "ab"
    plan = ab.build_plan(table, root=root, rows=["full"], seeds=1)
    ab.run_plan(plan, echo=lambda m: None)
    copy = load_table(write_table(tmp_path, "t2.yaml", **{**_table_fields(table), "table": "2"}))
    other = ab.build_plan(copy, root=root, rows=["full"], seeds=1)
    assert other.runs[0].dir != plan.runs[0].dir and other.runs[0].state == "done"
    assert other.runs[0].result_dir == plan.runs[0].dir
    assert ab.collect(other).cells[("full", "mIoU")].status == "ok"


def _table_fields(t) -> dict:
    return yaml.safe_load(Path(t.path).read_text())


def test_second_stage_starts_from_the_first_stage_run(tmp_path, synthetic_root):
    stage1 = str(tiny_recipe(tmp_path, synthetic_root, "stage1.yaml"))
    stage2 = str(tiny_recipe(tmp_path, synthetic_root, "stage2.yaml", tuning={"name": "head"}))
    t = load_table(write_table(tmp_path, columns=[{"name": "mIoU", "metric": "mIoU"}],
                               load_from={stage2: stage1},
                               rows=[{"name": "stage 2", "recipe": stage2, "paper": [1.0]}]))
    plan = ab.build_plan(t, root=tmp_path / "ab")
    first, second = plan.runs  # the stage-1 run is needed although no cell shows it
    assert second.load_from is first and Path(first.recipe).name == "stage1.yaml"
    assert "--load-from" in ab.command(second) and str(first.dir) in " ".join(ab.command(second))
    report = ab.run_plan(plan, echo=lambda m: None)
    assert not report.failed and [r.label for r in report.launched] == ["stage1", "stage2"]
    assert f"loaded weights from {first.dir}/checkpoints/best.pt" in (second.dir / "train.log").read_text()


def _fake_run(run: ab.Run, metrics: dict, per_class: list[dict] | None = None) -> None:
    """A finished run directory as `train` leaves it: config.yaml, the end record and eval.json."""
    run.dir.mkdir(parents=True)
    (run.dir / "config.yaml").write_text(dump_recipe(run.cfg))
    (run.dir / "metrics.jsonl").write_text(json.dumps({"iter": 6, "loss": 1.0}) + "\n"
                                           + json.dumps({"event": "end", "status": "finished", "iter": 6}) + "\n")
    (run.dir / "eval.json").write_text(json.dumps({"checkpoint": "last", "iter": 6, **metrics,
                                                   "per_class": per_class or []}))


def test_collect_with_missing_cells_and_several_seeds(tmp_path, synthetic_root):
    recipe = str(tiny_recipe(tmp_path, synthetic_root))
    t = load_table(write_table(
        tmp_path,
        columns=[{"name": "Dice", "metric": "Dice.{key}", "seeds": {"key": "data.subset_seed", "values": [0, 1, 2]}},
                 {"name": "mIoU", "metric": "mIoU"}, {"name": "Head", "params": "head"},
                 {"name": "Gain", "gain": {"base": "mIoU", "new": "Dice"}}, {"name": "Ref"}],
        rows=[{"name": "a", "key": "disk", "recipe": recipe, "paper": ["70.00±1.00", 40.0, None, None, 3.5]},
              {"name": "b", "key": "disk", "recipe": recipe, "set": ["optimizer.lr=0.1"],
               "paper": ["60±2", 30.0, None, None, None], "skip": ["mIoU"]}],
        plot={"y": ["Dice", "mIoU"], "ylabel": "%"}))
    plan = ab.build_plan(t, root=tmp_path / "ab")
    a_runs = next(c for c in plan.cells if (c.row.name, c.col.name) == ("a", "Dice")).runs
    dice = [72.0, 75.0, 81.0]
    for run, v in zip(a_runs, dice):
        _fake_run(run, {"mIoU": v - 30}, [{"class": "background", "Dice": 99.0, "pixels": 30},
                                          {"class": "disk", "Dice": v, "pixels": 10}])
    b_runs = next(c for c in plan.cells if (c.row.name, c.col.name) == ("b", "Dice")).runs
    _fake_run(b_runs[1], {"mIoU": 1.0}, [{"class": "disk", "Dice": 64.0, "pixels": 5}])  # 1 of 3 seeds finished
    col = ab.collect(plan)
    c = col.cells[("a", "Dice")]
    mean = sum(dice) / 3
    std = (sum((v - mean) ** 2 for v in dice) / 2) ** 0.5  # sample std, ddof = 1
    assert c.status == "ok" and c.mean == pytest.approx(mean) and c.std == pytest.approx(std)
    assert c.diff == pytest.approx(mean - 70.0)  # a 'mean±std' paper value is compared by its mean
    assert col.cells[("a", "mIoU")].values == [42.0]  # the seed-less column reads the recipe's seed (0)
    assert col.cells[("a", "Gain")].mean == pytest.approx(100 * (mean - 42.0) / 42.0)
    assert col.cells[("a", "Head")].mean > 0 and col.cells[("a", "Ref")].status == "reference"
    b = col.cells[("b", "Dice")]
    assert b.status == "partial" and b.values == [64.0] and b.std is None
    assert col.cells[("b", "mIoU")].status == "skipped"
    assert {(m.row, m.column) for m in col.missing} == {("b", "Dice"), ("b", "Gain")}
    assert "run " in b.reason and "missing" in b.reason

    written = ab.export(col, tmp_path / "tables")
    assert [p.name for p in written] == ["test_table1.csv", "test_table1.md", "test_table1.tex", "test_table1.png"]
    csv = pd.read_csv(written[0])
    row = csv[(csv.row == "a") & (csv.column == "Dice")].iloc[0]
    assert row.ours_mean == pytest.approx(mean) and row.seeds_done == 3 and row.paper_mean == 70.0
    md = written[1].read_text()
    assert f"{mean:.2f}±{std:.2f} / 70.00±1.00 ({mean - 70:+.2f})" in md
    assert "64.00 (1/3 seeds) / 60.00±2.00" in md and "2 missing or partial" in md
    assert "\\begin{tabular}" in written[2].read_text()
    assert written[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    smoke = ab.export(dataclasses.replace(col, scale="smoke"), tmp_path / "tables")
    assert smoke[0].name == "test_table1_smoke.csv"
    for p in smoke[:3]:
        assert ab.SMOKE_BANNER in p.read_text()
    assert "n/a" in ab.ours_text(col.cells[("a", "Ref")])


def test_metric_lookup():
    result = {"mIoU": 50.0, "per_class": [{"class": "road", "IoU": 90.0, "pixels": 75},
                                          {"class": "car", "IoU": 60.0, "pixels": 20},
                                          {"class": "bus", "IoU": None, "pixels": 5}],
              "confusion_matrix": [[70, 3, 2], [4, 14, 2], [1, 2, 2]]}
    assert ab.metric_value(result, "mIoU") == 50.0
    assert ab.metric_value(result, "IoU.car") == 60.0
    assert ab.metric_value(result, "share.road") == 75.0
    # car and bus merged: intersection 14+2+2+2, ground truth 20+5, predicted 19+6
    assert ab.metric_value(result, "categoryIoU.vehicle", {"vehicle": ["car", "bus"]}) == pytest.approx(100 * 20 / 30)
    for bad, why in (("IoU.train", "no class 'train'"), ("IoU.bus", "no IoU"), ("mDice", "no 'mDice'"),
                     ("categoryIoU.flat", "no category")):
        with pytest.raises(KeyError, match=why):
            ab.metric_value(result, bad, {"vehicle": ["car"]})
    assert ab.parse_paper("76.07±0.57") == (76.07, 0.57) and ab.parse_paper(3) == (3.0, None)


def test_missing_recipe_is_planned_but_never_run(tmp_path, synthetic_root):
    recipe = str(tiny_recipe(tmp_path, synthetic_root))
    t = load_table(write_table(tmp_path, columns=[{"name": "mIoU", "metric": "mIoU"}],
                               rows=[{"name": "there", "recipe": recipe, "paper": [1.0]},
                                     {"name": "later", "recipe": str(tmp_path / "not_yet.yaml"), "paper": [2.0]}]))
    plan = ab.build_plan(t, root=tmp_path / "ab")
    assert [r.state for r in plan.runs] == ["missing", "recipe missing"]
    _, commands = ab.render_plan(plan)
    assert f"# 2: recipe missing: {tmp_path / 'not_yet.yaml'}" in commands
    with pytest.raises(SegpromptError, match="cannot run cells whose recipe is missing: .*not_yet.yaml.*--rows"):
        ab.run_plan(plan, echo=lambda m: None)
    assert not plan.runs[0].dir.exists()  # refused before anything ran
    col = ab.collect(plan)
    assert col.cells[("later", "mIoU")].status == "recipe missing"


@pytest.mark.slow
def test_slurm_path_through_submitit_local_executor(table, tmp_path):
    plan = ab.build_plan(table, root=tmp_path / "ab", rows=["head"], seeds=1)
    assert ab.command(plan.runs[0])[0] == "segprompt"
    with pytest.raises(SegpromptError, match="--partition"):
        ab.run_plan(plan, launcher="slurm", echo=lambda m: None)
    # submitit's local executor: the same submission (pickled job, a new process, its environment)
    report = ab.run_plan(plan, launcher="slurm", cluster="local", gpus=0, time_min=10, echo=lambda m: None)
    assert not report.failed, report.failed
    (run, job_id), = report.submitted
    assert run.done and json.loads((run.dir / "eval.json").read_text())["iter"] == 6
    record = json.loads((plan.root / "_jobs" / f"{run.dir.name}.json").read_text())
    assert record["job_id"] == job_id and record["cluster"] == "local" and record["dir"] == str(run.dir)
    assert ab.run_plan(ab.build_plan(table, root=tmp_path / "ab", rows=["head"], seeds=1), launcher="slurm",
                       cluster="local", gpus=0, echo=lambda m: None).submitted == []  # finished: not resubmitted


def test_slurm_submission_with_fake_sbatch_and_sacct(tmp_path, synthetic_root, monkeypatch):
    """What reaches Slurm: partition, time, GPUs and tasks, the stage-2 dependency; no double submission."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch.calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                                    f'echo "Submitted batch job $((100 + $(wc -l < {calls})))"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit only checks that it exists
    (bin_dir / "sacct").write_text('#!/bin/sh\nprintf "JobID|State|NodeList\\n101|PENDING|\\n102|PENDING|\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    stage1 = str(tiny_recipe(tmp_path, synthetic_root, "stage1.yaml"))
    stage2 = str(tiny_recipe(tmp_path, synthetic_root, "stage2.yaml", tuning={"name": "head"}))
    t = load_table(write_table(tmp_path, columns=[{"name": "mIoU", "metric": "mIoU"}], load_from={stage2: stage1},
                               rows=[{"name": "stage 2", "recipe": stage2, "paper": [1.0]}]))
    plan = ab.build_plan(t, root=tmp_path / "ab")
    report = ab.run_plan(plan, launcher="slurm", partition="gpu", gpus=2, time_min=90, echo=lambda m: None)
    assert [(r.label, job) for r, job in report.submitted] == [("stage1", "101"), ("stage2", "102")]
    scripts = {p.name.split("_")[0]: p.read_text() for p in (plan.root / "_submitit").glob("*_submission.sh")}
    for job in ("101", "102"):
        for line in ("--partition=gpu", "--time=90", "--gpus-per-node=2", "--ntasks-per-node=2", "--nodes=1"):
            assert f"#SBATCH {line}\n" in scripts[job], (job, line)
    assert "#SBATCH --dependency=afterok:101\n" in scripts["102"] and "--dependency" not in scripts["101"]
    # sacct says both are still pending: a second --run submits nothing
    again = ab.run_plan(ab.build_plan(t, root=tmp_path / "ab"), launcher="slurm", partition="gpu", gpus=2,
                        echo=lambda m: None)
    assert again.submitted == [] and [why for _, why in again.waiting] == ["job 101 still queued or running",
                                                                           "job 102 still queued or running"]
    assert len(calls.read_text().splitlines()) == 2


@pytest.mark.slow
def test_torchrun_launcher_runs_the_printed_command(table, tmp_path):
    plan = ab.build_plan(table, root=tmp_path / "ab", rows=["head"], seeds=1)
    report = ab.run_plan(plan, launcher="torchrun", gpus=1, echo=lambda m: None)
    assert not report.failed, report.failed
    run = plan.runs[0]
    assert run.done and json.loads((run.dir / "eval.json").read_text())["iter"] == 6
    env = json.loads((run.dir / "env.json").read_text())
    assert env["world_size"] == 1 and env["argv"][1:3] == ["train", str(run.recipe)]
    assert "iter 6/6" in (plan.root / "_logs" / f"{run.dir.name}.log").read_text()  # torchrun's output


@pytest.mark.slow
def test_cli_smoke_table_plan_and_list(tmp_path):
    res = run_cli("ablate", "--table", "4", "--scale", "smoke", "--rows", "1", "--seeds", "2",
                  "--results", str(tmp_path / "ab"), "--out", str(tmp_path / "tables"), "--data", str(tmp_path / "data"),
                  cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "SMOKE SCALE" in res.stdout and "4 run(s) finished now" in res.stdout
    md = (tmp_path / "tables" / "spm_table4_smoke.md").read_text()
    assert ab.SMOKE_BANNER in md and "| 1 |" in md and "/ 74.32±0.79" in md and "/ 34.43 (" in md
    assert "first 2 seed(s) of each cell (the paper: 5)" in md
    assert (tmp_path / "tables" / "spm_table4_smoke.png").is_file()
    # every table and figure of both papers plans
    from segprompt.experiments.tables import all_tables

    for paper in ("spm", "stdc"):
        res = run_cli("ablate", "--paper", paper, "--plan", "--results", str(tmp_path / "ab"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        for t in all_tables():
            assert (f"{t.id}:" in res.stdout) == (t.paper == paper)
    res = run_cli("ablate", "--list")
    lines = res.stdout.splitlines()
    assert res.returncode == 0
    assert sum(line.startswith("│ spm ") for line in lines) == 10  # Tables 1-9 and Figure 5
    assert sum(line.startswith("│ stdc ") for line in lines) == 9  # Tables 1-8 and Figure 5
