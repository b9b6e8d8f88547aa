"""``segprompt prepare DATASET --check``: re-verify a prepared folder (listed files exist and decode,
counts, sizes, label values, the class prior's SHA-256)."""

from __future__ import annotations

from pathlib import Path

from segprompt.data.meta import ANN_DIR, IMG_DIR, DatasetMeta, read_meta, shared_stem
from segprompt.data.prepare.samples import (
    IMAGE_EXTS,
    Progress,
    Sample,
    _check_sample,
    parallel_map,
)
from segprompt.errors import SegpromptError
from segprompt.io import sha256_file

# what `segprompt prepare` makes (segprompt.data.prepare.DATASETS, and the two it generates or pairs)
KNOWN = ("synthetic", "folder", "cityscapes", "camvid", "ade20k", "vaihingen", "chase_db1", "stare")


def check(dataset: str, out: Path, *, nproc: int = 1, progress: Progress | None = None,
          max_problems: int = 20) -> DatasetMeta:
    """Re-verify a prepared folder: listed files exist and decode, counts, sizes, label values, prior."""
    out = Path(out)
    meta = read_meta(out, dataset)
    if meta.name != dataset:
        if meta.name not in KNOWN:  # a meta.json written by hand, or by another tool
            raise SegpromptError(f"'{out}' holds the dataset '{meta.name}', which `segprompt prepare` does not "
                                 f"make, so it cannot be checked. Prepare your own images and masks with "
                                 f"`segprompt prepare folder --images DIR --masks DIR --classes a,b,... --out DIR`, "
                                 f"then `segprompt prepare folder --check --out DIR`")
        raise SegpromptError(f"'{out}' holds the dataset '{meta.name}', not '{dataset}': "
                             f"run `segprompt prepare {meta.name} --check --out {out}`")
    problems: list[str] = []
    listed: dict[str, list[str]] = meta.extra.get("files") or {}
    if not listed:  # folders written before file lists were recorded (e.g. synthetic): what is there
        for split in meta.splits:
            folder = out / IMG_DIR / split
            listed[split] = sorted(p.name for p in folder.iterdir()
                                   if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []
    samples: list[Sample] = []
    for split in sorted(set(listed) | set(meta.splits)):
        names = listed.get(split, [])
        if len(names) != meta.splits.get(split, 0):
            problems.append(f"split '{split}': meta.json counts {meta.splits.get(split, 0)} samples, "
                            f"lists {len(names)}")
        expected = (meta.extra.get("expected_counts") or {}).get(split)
        if expected is not None and expected != len(names):
            problems.append(f"split '{split}': {len(names)} samples, {expected} expected")
        for sub, wanted in ((IMG_DIR, set(names)), (ANN_DIR, {f"{Path(n).stem}.png" for n in names})):
            folder = out / sub / split
            have = {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()
            problems += [f"missing file '{folder / n}'" for n in sorted(wanted - have)]
            problems += [f"unexpected file '{folder / n}' (not listed in meta.json)" for n in sorted(have - wanted)]
        folder = out / IMG_DIR / split
        twins = shared_stem(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)) \
            if folder.is_dir() else None
        if twins:
            problems.append(f"'{twins[0]}' and '{twins[1]}' share the stem '{twins[1].stem}'")
        samples += [Sample(split, Path(n).stem, Path(n).suffix) for n in names]
    results = parallel_map(_check_sample, [(out, s, meta.num_classes) for s in samples], nproc, "verifying",
                           progress)
    found: dict[str, set[int]] = {split: set() for split in meta.splits}
    damaged: set[str] = set()
    for s, (values, problem) in zip(samples, results, strict=True):
        if problem:
            problems.append(problem)
            damaged.add(s.split)
        else:
            found.setdefault(s.split, set()).update(values)
    for split, values in found.items():
        if split not in damaged and sorted(values) != sorted(meta.label_values.get(split, [])):
            problems.append(f"split '{split}': label values {sorted(values)} differ from those meta.json "
                            f"records ({meta.label_values.get(split)})")
    prior = meta.extra.get("class_prior")
    if prior:
        path = out / prior["file"]
        if not path.is_file():
            problems.append(f"class prior '{path}' is missing")
        elif sha256_file(path) != prior["sha256"]:
            problems.append(f"class prior '{path}' does not match the SHA-256 meta.json records")
    if problems:
        more = f" (and {len(problems) - max_problems} more)" if len(problems) > max_problems else ""
        raise SegpromptError(f"'{out}' fails the check ({len(problems)} problem(s)){more}:\n  "
                             + "\n  ".join(problems[:max_problems])
                             + (f"\nRegenerate it: `segprompt prepare synthetic --out {out} --force` with the "
                                f"options it was made with (meta.json records them)" if dataset == "synthetic" else
                                f"\nRe-run `segprompt prepare folder --images ... --masks ... --out {out}` with the "
                                f"options meta.json records, to redo what is missing" if dataset == "folder" else
                                f"\nRe-run `segprompt prepare {dataset} --src ... --out {out}` to redo what is "
                                f"missing, or --force to redo everything."))
    return meta
