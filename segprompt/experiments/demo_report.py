"""The report of ``segprompt demo``: the table (trainable parameters, mean ± std over seeds, "gap
recovered" = (method - head) / (full - head)), the verdict computed from it (no number in it is
typed), and the files it writes (``demo.md``, ``.csv``, ``.json``, ``.png``; ``docs/demo.md``).

"% of full" is :func:`~segprompt.measure.params.percent_of_full` of a row's trainable parameters and
the Full-Tuning row's (every parameter counted, as the demo records them: docs/measurement.md), the
number count-params and the training log print."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from segprompt.io import atomic_write_json, atomic_write_text
from segprompt.measure.params import percent_of_full

# the parameter-efficient methods SPM is compared against
BASELINES = ("bias", "adapter", "vpt", "adaptformer", "lora")


LABELS = {"zero-shot": "Zero-shot (source model)", "head": "Head-Tuning", "bias": "Bias-Tuning",
          "adapter": "Adapter", "vpt": "VPT-deep", "adaptformer": "AdaptFormer", "lora": "LoRA",
          "spm": "SPM (ours)", "spm:featnorm": "SPM, F normalised at the branch inputs", "full": "Full-Tuning", "side": "Side-Tuning", "scratch": "Learn-from-Scratch"}


@dataclass
class Row:
    """One line of the report: a method (or a control) over its seeds at its chosen rate."""

    method: str
    label: str
    trainable: int
    lr: float | None
    scores: list[float]  # target-test mIoU per seed (NaN: that seed diverged)
    val: dict[str, float] = field(default_factory=dict)  # lr -> target-val mIoU of seed 0 (the sweep)

    @property
    def finished(self) -> list[float]:
        return [s for s in self.scores if not math.isnan(s)]

    @property
    def diverged(self) -> int:
        return len(self.scores) - len(self.finished)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finished) if self.finished else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.finished) if len(self.finished) > 1 else 0.0


def row_json(r: Row) -> dict:
    """A row for demo.json: a diverged seed is null (JSON has no NaN)."""
    nan_to_none = lambda x: None if math.isnan(x) else x  # noqa: E731
    return dict(asdict(r), scores=[nan_to_none(x) for x in r.scores], val={k: nan_to_none(v) for k, v in r.val.items()},
                mean=nan_to_none(r.mean), std=r.std, diverged=r.diverged)


def rank_score(x: float) -> float:
    """A score to choose by: a diverged run (NaN) ranks below every finished one."""
    return -math.inf if math.isnan(x) else x


def gap_recovered(row: Row, head: Row, full: Row) -> float:
    """(row - head) / (full - head) over the seeds' means; a control, which runs seed 0 only, is
    measured against head and full of seed 0."""
    if row.method.startswith("only-"):
        h, f, r = head.scores[0], full.scores[0], row.scores[0]
    else:
        h, f, r = head.mean, full.mean, row.mean
    return (r - h) / (f - h) if f > h else math.nan


def verdict(rows: list[Row]) -> str:
    """One sentence from the table: how much of the head->full gap SPM recovers, with what share of
    full tuning's parameters, and whether it beats the best parameter-efficient baseline by more
    than the seeds' spread (the larger of the two standard deviations)."""
    by = {r.method: r for r in rows}
    head, full = by["head"], by["full"]
    gap = full.mean - head.mean
    noise = max(head.std, full.std)
    if math.isnan(gap):
        return "Head or full tuning diverged at every seed: the table has no gap to measure against."
    if gap <= noise:
        return (f"The benchmark does not separate the methods: full tuning ({full.mean:.1f}) is not above head "
                f"tuning ({head.mean:.1f}) by more than the seeds' spread ({noise:.1f}).")
    parts = []
    if "spm" in by:
        spm = by["spm"]
        parts.append(f"SPM recovers {100 * gap_recovered(spm, head, full):.0f} % of the head->full gap "
                     f"({gap:.1f} mIoU) with {percent_of_full(spm.trainable, full.trainable):.0f} % of full tuning's "
                     f"trainable parameters")
        others = [by[m] for m in BASELINES if m in by]
        if others:
            best = max(others, key=lambda r: r.mean)
            margin = max(spm.std, best.std)
            if spm.mean - best.mean > margin:
                parts.append(f"it beats the best baseline, {best.label} ({spm.mean:.1f} ± {spm.std:.1f} vs "
                             f"{best.mean:.1f} ± {best.std:.1f})")
            elif best.mean - spm.mean > margin:
                parts.append(f"it does not beat {best.label} at this scale ({spm.mean:.1f} ± {spm.std:.1f} vs "
                             f"{best.mean:.1f} ± {best.std:.1f})")
            else:
                parts.append(f"it is within the seeds' spread of the best baseline, {best.label} "
                             f"({spm.mean:.1f} ± {spm.std:.1f} vs {best.mean:.1f} ± {best.std:.1f})")
        for v in (r for r in rows if r.method.startswith("spm:")):  # design variants, chosen on val as SPM
            parts.append(f"{v.label}: {100 * gap_recovered(v, head, full):.0f} % ({v.mean:.1f} ± {v.std:.1f} vs "
                         f"SPM's {spm.mean:.1f} ± {spm.std:.1f})")
    else:
        parts.append(f"Full tuning is {gap:.1f} mIoU above head tuning")
    sentence = "; ".join(parts) + "."
    if min(len(r.scores) for r in rows if not r.method.startswith("only-")) < 2:
        sentence += " (One seed: no spread to compare against; use --seeds 3 or more.)"
    controls = [r for r in rows if r.method.startswith("only-")]
    if controls:
        top = max(controls, key=lambda r: gap_recovered(r, head, full))
        sentence += (f" Tuning one backbone part alone recovers at most {100 * gap_recovered(top, head, full):.0f} % "
                     f"of it ({top.method[len('only-'):]}, seed 0).")
    return sentence


def table_lines(report: dict, rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """The report's table as columns and rows of text (the CLI prints it, the Markdown holds it)."""
    by = {r.method: r for r in rows}
    head, full = by["head"], by["full"]
    cols = ["method", "trainable params", "% of full", "lr (chosen on val)", "target-test mIoU", "gap recovered"]
    lines = []
    zero = report["zero_shot"]
    lines.append([LABELS["zero-shot"], "0", "0 %", "-",
                  "n/a (new classes)" if zero is None else f"{zero:.2f}", "-"])
    for r in rows:
        rec = gap_recovered(r, head, full)
        score = ("diverged" if not r.finished else
                 f"{r.mean:.2f} ± {r.std:.2f}" if len(r.finished) > 1 else f"{r.mean:.2f} (1 seed)")
        if r.diverged and r.finished:
            score += f" ({r.diverged} of {len(r.scores)} seeds diverged)"
        lines.append([r.label, f"{r.trainable:,}", f"{percent_of_full(r.trainable, full.trainable):.1f} %", f"{r.lr:g}",
                      score, "-" if math.isnan(rec) else f"{100 * rec:.0f} %"])
    return cols, lines


def edge_note(report: dict) -> str:
    grid = ", ".join(f"{x:g}" for x in report["lrs"])
    return ("Chosen at an end of the learning-rate grid (" + grid + "): "
            + ", ".join(f"{LABELS.get(m, m)} {lr:g}" for m, lr in report["edge_of_grid"].items())
            + "; a wider grid could move these rows.")


def source_line(report: dict) -> str:
    """What the adapted backbone is, whether its weights are ImageNet's, and the user's ``--set``."""
    changed = (f" Every adaptation run with --set {' '.join(report['overrides'])}."
               if report.get("overrides") else "")
    if report.get("source") == "ImageNet":
        return (f"Backbone: {report['backbone']}, ImageNet-pretrained (real features; weights {report['weights']}), "
                f"adapted to the synthetic target with no source pretraining.{changed}")
    return (f"Backbone: {report['backbone']}, pre-trained on the synthetic source (not ImageNet); "
            f"source-val mIoU of the source model: {report['source_val_mIoU']:.2f}.{changed}")


def write_report(out: Path, report: dict, rows: list[Row]) -> None:
    import matplotlib  # here, not at the top: only the report files need it and pandas (slow to load)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    cols, lines = table_lines(report, rows)
    df = pd.DataFrame([{"method": r.method, "label": r.label, "trainable_params": r.trainable, "lr": r.lr,
                        "mIoU_mean": round(r.mean, 3), "mIoU_std": round(r.std, 3), "seeds": len(r.scores),
                        "scores": " ".join(f"{s:.2f}" for s in r.scores),
                        "val_sweep": " ".join(f"{k}:{v:.2f}" for k, v in r.val.items())} for r in rows])
    atomic_write_text(out / "demo.csv", df.to_csv(index=False))
    md = [source_line(report), "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(line) + " |" for line in lines]
    md += ["", f"**Verdict:** {report['verdict']}", ""]
    if report.get("edge_of_grid"):
        md += [edge_note(report), ""]
    atomic_write_text(out / "demo.md", "\n".join(md))
    atomic_write_json(out / "demo.json", report)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        if r.method.startswith("only-"):
            continue
        ax.errorbar(r.trainable, r.mean, yerr=r.std, fmt="o", capsize=3)
        ax.annotate(r.label, (r.trainable, r.mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("target-test mIoU (%), mean ± std over seeds")
    ax.set_title(f"segprompt demo ({report['backbone']}): {report.get('source', 'synthetic')} source -> target")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=120)
    plt.close(fig)


def rows_from_report(report: dict) -> list[Row]:
    keep = {f for f in Row.__dataclass_fields__}
    none_to_nan = lambda x: math.nan if x is None else x  # noqa: E731
    return [Row(**{k: v for k, v in r.items() if k in keep} | {"scores": [none_to_nan(x) for x in r["scores"]],
                                                               "val": {k: none_to_nan(v) for k, v in r["val"].items()}})
            for r in report["rows"]]
