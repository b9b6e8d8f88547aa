"""The synthetic transfer demo end to end, on a tiny schedule."""

from __future__ import annotations

import pandas as pd

from segprompt.engine.demo import run_demo


def test_demo_pretrains_once_adapts_and_reports(tmp_path):
    kw = dict(data_root=tmp_path / "data", cache_root=tmp_path / "cache",
              pretrain_overrides=["schedule.iters=3", "checkpoint.interval=3", "runtime.num_workers=0"],
              adapt_overrides=["schedule.iters=2", "checkpoint.interval=2", "runtime.num_workers=0"])
    rows = run_demo(tmp_path / "out", ["head", "spm"], **kw)
    assert [r.method for r in rows] == ["head", "spm"]
    assert rows[1].trainable > rows[0].trainable > 0 and all(0 <= r.mIoU <= 100 for r in rows)
    df = pd.read_csv(tmp_path / "out" / "demo.csv")
    assert list(df["method"]) == ["Head-Tuning", "SPM (ours)"]
    assert (tmp_path / "out" / "demo.png").stat().st_size > 0 and (tmp_path / "out" / "demo.md").is_file()
    cached = list((tmp_path / "cache").glob("source-*/backbone.pth"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run_demo(tmp_path / "out2", ["head"], **kw)  # the source backbone is reused, not retrained
    assert cached[0].stat().st_mtime_ns == stamp
