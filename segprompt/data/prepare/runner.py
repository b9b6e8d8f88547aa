"""Running a conversion: from the official archives to a finished, verified prepared folder.

Conventions of ``docs/datasets.md`` ("The prepared layout and its rules"): labels are remapped once, here, into train
IDs 0..K-1 with 255 = ignore; prepare works offline from archives the user already has; it checks
per-split counts, the label value set and equal image/label sizes, and records the sources
(names, sizes, SHA-256), the options, the counts and the label values found in ``meta.json``.

- :class:`Source` reads the members of a zip, a tar (plain or gzipped) or an already-extracted
  folder through one interface, and inflates gzipped members (STARE's ``.ppm.gz``) on request.
- :func:`find_sources` picks each archive by its official name (never by globbing, so a stray
  archive is never taken for another) and names the archive and its publisher when it is missing.
- :func:`run` converts a :class:`Plan` of jobs in parallel. Every output file is written atomically
  (temporary name in the same folder, then ``os.replace``), finished samples are skipped, and
  ``meta.json`` is written last: an interrupted conversion resumes and never trusts a half-written
  file. The same options on a finished folder leave it untouched; other options are an error;
  ``force`` moves the old folder aside (nothing is deleted).
- :func:`check` re-verifies a prepared folder (``segprompt prepare DATASET --check``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segprompt.data.class_prior import cached_class_prior, prior_cache_path
from segprompt.data.meta import (
    ANN_DIR,
    IMG_DIR,
    META_FILE,
    DatasetMeta,
    read_meta,
    write_meta,
)
from segprompt.data.prepare.archive import (
    ArchiveSpec,
    Source,
    close_sources,
    find_sources,
)
from segprompt.data.prepare.labels import IGNORE_INDEX
from segprompt.data.prepare.samples import (
    Job,
    Plan,
    Progress,
    _verify_job,
    parallel_map,
)
from segprompt.errors import SegpromptError
from segprompt.io import (
    atomic_write_json,
    move_aside,
    remove_stale_temporaries,
    sha256_file,
)

CONVERTER_VERSION = 1  # bump when the same archives and options start producing different files


STATE_FILE = ".segprompt-prepare.json"  # present while a conversion is unfinished


PRIOR_RES = 64  # resolution of the train-split class prior recorded in meta.json (SPM's M0)


def _run_job(root: Path, job: Job) -> list[list[int]]:
    return job.fn(root, *job.args)


def _source_id(role: str, name: str, kind: str, size: int | None) -> dict[str, Any]:
    """What identifies a source cheaply, compared on reruns: role, name, kind and archive size."""
    return {"role": role, "name": name, "kind": kind, "size": None if kind == "folder" else size}


def _source_ids(sources: dict[str, Source]) -> list[dict[str, Any]]:
    return [_source_id(role, s.path.name, s.kind, None if s.kind == "folder" else s.path.stat().st_size)
            for role, s in sources.items()]


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files a killed run of ours left (a live run's are kept, see segprompt.io)."""
    for sub in (IMG_DIR, ANN_DIR):
        for split in (out / sub).glob("*"):
            remove_stale_temporaries(split)


def _recorded(dataset: str, out: Path) -> dict[str, Any] | None:
    """What an earlier run recorded in ``out``: dataset, options, source ids, hashes (and meta if finished)."""
    if (out / META_FILE).is_file():
        try:
            meta = read_meta(out, dataset)
        except SegpromptError:
            return None
        sources = meta.extra.get("sources") or []
        return {"dataset": meta.name, "options": meta.extra.get("options"), "meta": meta,
                "sources": [_source_id(s["role"], s["name"], s["kind"], s["size"]) for s in sources],
                "hashes": {s["role"]: s for s in sources}}
    if (out / STATE_FILE).is_file():
        try:
            return json.loads((out / STATE_FILE).read_text())
        except json.JSONDecodeError:
            return None
    return None


def _prepare_folder(dataset: str, out: Path, options: dict[str, Any], ids: list[dict[str, Any]],
                    force: bool, log: Callable[[str], None] | None) -> tuple[DatasetMeta | None, dict[str, Any]]:
    """Decide what to do with ``out``: (a finished meta to return as is, or None; cached source hashes)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None, {}
    if not out.is_dir():
        raise SegpromptError(f"--out '{out}' is a file; pass a folder")
    if force:
        aside = move_aside(out)
        if log:
            log(f"moved the previous '{out}' aside to '{aside}' (nothing deleted)")
        return None, {}
    rec = _recorded(dataset, out)
    if rec is None:
        why = "holds files that `segprompt prepare` did not write"
    elif rec.get("dataset") != dataset:
        why = f"holds the dataset '{rec.get('dataset')}'"
    elif rec.get("options") != options:
        why = f"was prepared with other options ({rec.get('options')}; now {options})"
    elif rec.get("sources") != ids:
        why = f"was prepared from other sources ({rec.get('sources')}; now {ids})"
    else:
        why = ""
    if why:
        raise SegpromptError(f"--out '{out}' {why}. Pass another --out, or --force to redo it "
                             f"(the old folder is kept as '{out.name}.old-<timestamp>').")
    hashes = rec.get("hashes") or {}
    meta: DatasetMeta | None = rec.get("meta")
    if meta is not None:
        files = meta.extra.get("files") or {}
        if all((out / IMG_DIR / split / name).is_file()
               and (out / ANN_DIR / split / f"{Path(name).stem}.png").is_file()
               for split, names in files.items() for name in names):
            return meta, hashes
        # Finished once, files lost since: resume; finished files are kept and the rest redone.
        if log:
            log(f"'{out}' misses files listed in its meta.json: converting them again")
        atomic_write_json(out / STATE_FILE, {"dataset": dataset, "options": options, "sources": ids,
                                             "hashes": hashes})
        (out / META_FILE).unlink()
    return None, hashes


def _fingerprints(sources: dict[str, Source], used: dict[str, list[str]], cached: dict[str, Any],
                  progress: Progress | None) -> list[dict[str, Any]]:
    """Name, kind, size and SHA-256 of each source (reused from ``cached`` when size and mtime agree)."""
    out = []
    for i, (role, s) in enumerate(sources.items()):
        members = used.get(role, [])
        size = s.size(members)
        mtime = s.path.stat().st_mtime_ns if s.kind != "folder" else None
        old = cached.get(role) or {}
        same = (old.get("name") == s.path.name and old.get("size") == size and old.get("mtime_ns") == mtime
                and s.kind != "folder")
        entry = {"role": role, "name": s.path.name, "kind": s.kind, "size": size,
                 "sha256": old["sha256"] if same else s.sha256(members), "mtime_ns": mtime}
        if s.kind == "folder":
            entry["files"] = len(members)
        out.append(entry)
        if progress:
            progress("hashing", i + 1, len(sources))
    return out


def class_prior_entry(root: Path, train_labels: list[Path], num_classes: int) -> dict[str, Any]:
    """Compute (or reuse) the train-split class prior through the SPM's cache and describe the file."""
    prior = cached_class_prior(root, train_labels, num_classes, IGNORE_INDEX, PRIOR_RES)
    path = prior_cache_path(root, train_labels, num_classes, PRIOR_RES)
    if not path.is_file() or not np.array_equal(np.load(path), prior):
        raise SegpromptError(f"could not write the class prior '{path}' (is '{root}' writable?)")
    return {"split": "train", "res": PRIOR_RES, "file": path.relative_to(root).as_posix(),
            "sha256": sha256_file(path)}


def run(dataset: str, specs: Sequence[ArchiveSpec], src: Sequence[Path], out: Path, options: dict[str, Any],
        build_plan: Callable[[dict[str, Source]], Plan], expected: dict[str, int] | None, *,
        all_names: Sequence[str] = (), nproc: int = 1, force: bool = False,
        progress: Progress | None = None, log: Callable[[str], None] | None = None) -> DatasetMeta:
    """Convert ``src`` into the prepared layout at ``out`` (see the module docstring).

    ``build_plan(sources)`` lists the jobs; ``expected`` are the per-split counts to insist on (None:
    no count check); ``log`` receives one-line notes (e.g. where a forced folder was moved).
    """
    try:
        sources = find_sources(dataset, specs, src, all_names)
        return convert(dataset, sources, Path(out), options, build_plan, expected, nproc=nproc, force=force,
                       progress=progress, log=log)
    finally:
        close_sources()


def convert(dataset: str, sources: dict[str, Source], out: Path, options: dict[str, Any],
            build_plan: Callable[[dict[str, Source]], Plan], expected: dict[str, int] | None, *, nproc: int = 1,
            force: bool = False, progress: Progress | None = None,
            log: Callable[[str], None] | None = None) -> DatasetMeta:
    """:func:`run` once the sources are found (``segprompt prepare folder`` names its folders itself)."""
    ids = _source_ids(sources)
    options = {"converter_version": CONVERTER_VERSION, **options}
    finished, cached = _prepare_folder(dataset, out, options, ids, force, log)
    if finished is not None:
        return finished

    plan = build_plan(sources)
    if set(plan.used) != set(sources):  # a converter bug, not a user error
        raise RuntimeError(f"{dataset}: the plan's sources {sorted(plan.used)} are not {sorted(sources)}")
    samples = plan.samples()
    keys = [(s.split, s.stem) for s in samples]
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in Counter(keys).items() if n > 1)
        raise SegpromptError(f"{dataset}: two source files give the same output '{dup[0]}/{dup[1]}'")
    counts = dict(sorted(Counter(s.split for s in samples).items()))
    if expected is not None:
        expected = {k: v for k, v in sorted(expected.items()) if v > 0}  # an empty split has no folder
    if expected is not None and counts != expected:
        if options.get("expect_counts") is not None:
            raise SegpromptError(f"{dataset}: the sources hold {counts} samples per split, not the {expected} "
                                 f"--expect-counts asks for")
        raise SegpromptError(
            f"{dataset}: the sources hold {counts} samples per split but the official release has "
            f"{expected}. The archives are incomplete or not the official ones; to convert a subset on "
            f"purpose pass --expect-counts "
            + ",".join(f"{k}={v}" for k, v in counts.items()) + ".")

    out.mkdir(parents=True, exist_ok=True)
    state = {"dataset": dataset, "options": options, "sources": ids, "hashes": cached}
    atomic_write_json(out / STATE_FILE, state)
    fingerprints = _fingerprints(sources, plan.used, cached, progress)
    state["hashes"] = {f["role"]: f for f in fingerprints}
    atomic_write_json(out / STATE_FILE, state)
    _remove_stale_temporaries(out)

    num_classes = len(plan.classes)
    finished_jobs = [j.finished(out) for j in plan.jobs]
    todo = [j for j, done in zip(plan.jobs, finished_jobs, strict=True) if not done]
    skipped = [j for j, done in zip(plan.jobs, finished_jobs, strict=True) if done]
    written = parallel_map(_run_job, [(out, j) for j in todo], nproc, "converting", progress)
    checked = parallel_map(_verify_job, [(out, j.samples, num_classes) for j in skipped], nproc,
                           "verifying", progress)
    values: dict[str, set[int]] = {split: set() for split in counts}
    for job, per_sample in zip(todo + skipped, written + checked, strict=True):
        for sample, v in zip(job.samples, per_sample, strict=True):
            values[sample.split].update(v)

    train_labels = sorted(s.label(out) for s in samples if s.split == "train")
    if progress:
        progress("class prior", 0, 1)
    prior = class_prior_entry(out, train_labels, num_classes) if train_labels else None
    if progress:
        progress("class prior", 1, 1)

    files: dict[str, list[str]] = {split: [] for split in counts}
    for s in sorted(samples, key=lambda s: (s.split, s.stem)):
        files[s.split].append(s.image_name)
    meta = DatasetMeta(
        name=dataset, classes=list(plan.classes), palette=[list(map(int, c)) for c in plan.palette],
        ignore_index=IGNORE_INDEX, splits=counts,
        label_values={k: sorted(v) for k, v in values.items()},
        extra={"options": options, "sources": fingerprints, "expected_counts": expected,
               **plan.facts, "class_prior": prior, "files": files})
    write_meta(out, meta)  # last: its presence marks a finished folder
    (out / STATE_FILE).unlink(missing_ok=True)
    return meta


def parse_counts(text: str | None) -> dict[str, int] | None:
    """``"train=3,val=2"`` -> ``{"train": 3, "val": 2}`` (the --expect-counts option)."""
    if text is None:
        return None
    counts: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*([A-Za-z0-9_-]+)\s*=\s*(\d+)\s*", part)
        if not m:
            raise SegpromptError(f"--expect-counts '{text}': write SPLIT=N pairs separated by commas, "
                                 f"e.g. train=3,val=2")
        counts[m.group(1)] = int(m.group(2))
    return counts


def split_by_order(stems: list[str], counts: dict[str, int], dataset: str) -> dict[str, str]:
    """Assign sorted ``stems`` to splits in order, ``train`` first, then ``val``, then any other split
    (``counts``: split -> size), as mmseg's retinal converters do with sorted file names."""
    stems = sorted(stems)
    rank = {"train": 0, "val": 1}
    counts = dict(sorted(counts.items(), key=lambda kv: rank.get(kv[0], 2)))
    if sum(counts.values()) != len(stems):
        raise SegpromptError(f"{dataset}: found {len(stems)} images but the split sizes {counts} add up to "
                             f"{sum(counts.values())}; the archive is incomplete, or pass --expect-counts "
                             f"to convert a subset on purpose")
    out, i = {}, 0
    for split, n in counts.items():
        for stem in stems[i:i + n]:
            out[stem] = split
        i += n
    return out
