"""What every `segprompt prepare DATASET` shares: archives, parallel conversion, verification, meta.json.

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

import gzip
import hashlib
import json
import multiprocessing
import os
import re
import tarfile
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segprompt.data.meta import ANN_DIR, IMG_DIR, META_FILE, DatasetMeta, read_meta, write_meta
from segprompt.data.truncation import truncated, truncated_file
from segprompt.errors import SegpromptError
from segprompt.io import atomic_write_bytes, atomic_write_json, remove_stale_temporaries, sha256_file

CONVERTER_VERSION = 1  # bump when the same archives and options start producing different files
IGNORE_INDEX = 255
STATE_FILE = ".segprompt-prepare.json"  # present while a conversion is unfinished
PRIOR_RES = 64  # resolution of the train-split class prior recorded in meta.json (SPM's M0)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm")

# progress(stage, done, total): stages are "hashing", "converting", "verifying", "class prior"
Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------ sources

@dataclass(frozen=True)
class ArchiveSpec:
    """One official archive a dataset needs, recognised by name, and by its content when extracted."""

    role: str  # what it provides, e.g. "images", "labels"
    names: tuple[str, ...]  # official file names (the first is the one to ask for)
    marker: str  # regex a member path of this archive matches (relative, '/'-separated)
    example: str  # one such member path, for messages
    url: str  # where it is published
    note: str = ""  # how to obtain it, when that is not a plain download


class Source:
    """The members of one archive or extracted folder, addressed by relative '/'-separated paths.

    Picklable: worker processes reopen the archive themselves (one handle per process).
    """

    def __init__(self, path: Path, kind: str, spec: ArchiveSpec):
        self.path = Path(path)
        self.kind = kind  # "zip" | "tar" | "folder"
        self.spec = spec
        self._members: list[str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "spec": self.spec, "_members": None}

    def __repr__(self) -> str:
        return f"Source({str(self.path)!r}, {self.kind})"

    def where(self, member: str) -> str:
        return f"'{member}' in '{self.path}'"

    def _damaged(self, what: str, error: BaseException) -> SegpromptError:
        return SegpromptError(
            f"cannot read {what}: {error}. The {'folder' if self.kind == 'folder' else 'archive'} is "
            f"damaged (an incomplete download or copy?); get '{self.spec.names[0]}' again from "
            f"{self.spec.url}")

    def _handle(self) -> Any:
        # One handle per process (a forked file offset is shared) and per file version.
        st = self.path.stat()
        key = (os.getpid(), str(self.path), self.kind, st.st_size, st.st_mtime_ns)
        handle = _HANDLES.get(key)
        if handle is None:
            try:
                if self.kind == "zip":
                    handle = zipfile.ZipFile(self.path)
                elif self.kind == "tar":
                    handle = tarfile.open(self.path)
                    handle.getmembers()  # index once
                else:
                    handle = self.path
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as e:
                raise SegpromptError(
                    f"'{self.path}' is not a readable {self.kind} archive ({e}); it may be truncated: "
                    f"download '{self.spec.names[0]}' again from {self.spec.url}") from None
            _HANDLES[key] = handle
        return handle

    def members(self) -> list[str]:
        if self._members is None:
            h = self._handle()
            if self.kind == "zip":
                names = [i.filename for i in h.infolist() if not i.is_dir()]
            elif self.kind == "tar":
                names = [m.name for m in h.getmembers() if m.isfile()]
            else:
                names = []
                for d, dirs, files in os.walk(self.path):
                    dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                    rel = Path(d).relative_to(self.path)
                    names += [(rel / f).as_posix() for f in files if not f.startswith(".")]
            self._members = sorted(n.removeprefix("./") for n in names)
        return self._members

    def read(self, member: str) -> bytes:
        """The member's bytes; a ``.gz`` member is inflated. Missing or corrupt members are errors."""
        h = self._handle()
        try:
            if self.kind == "zip":
                data = h.read(member)
            elif self.kind == "tar":
                try:
                    f = h.extractfile(member)
                except KeyError:
                    f = h.extractfile("./" + member)
                if f is None:
                    raise KeyError(member)
                data = f.read()
            else:
                data = (self.path / member).read_bytes()
        except (KeyError, FileNotFoundError):
            raise SegpromptError(f"{self.where(member)} is missing; the {self.kind} does not hold the "
                                 f"official '{self.spec.names[0]}' content (from {self.spec.url})") from None
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise self._damaged(self.where(member), e) from None
        if member.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as e:
                raise self._damaged(f"the gzipped member {self.where(member)}", e) from None
        return data

    def size(self, members: Iterable[str] = ()) -> int:
        if self.kind != "folder":
            return self.path.stat().st_size
        return sum((self.path / m).stat().st_size for m in members)

    def sha256(self, members: Iterable[str] = ()) -> str:
        """SHA-256 of the archive file; for a folder, of the used members' paths and contents."""
        if self.kind != "folder":
            return sha256_file(self.path)
        h = hashlib.sha256()
        for m in sorted(members):
            h.update(f"{m}\0{sha256_file(self.path / m)}\n".encode())
        return h.hexdigest()


_HANDLES: dict[tuple, Any] = {}


def close_sources() -> None:
    """Close this process's open archives (after a conversion: the files may change before the next)."""
    for key in list(_HANDLES):
        handle = _HANDLES.pop(key)
        if hasattr(handle, "close"):
            handle.close()


def _archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    return None


def find_sources(dataset: str, specs: Sequence[ArchiveSpec], src: Sequence[Path],
                 all_names: Sequence[str] = ()) -> dict[str, Source]:
    """Locate each spec's archive by its official name in ``src`` (archives or folders), or else a
    folder there that holds its extracted content. ``all_names``: every archive name the dataset
    knows (any option), so a file passed explicitly that is none of them is reported as the wrong
    archive."""
    if not src:
        raise SegpromptError(f"`segprompt prepare {dataset}` needs --src: the folder holding "
                             + ", ".join(f"'{s.names[0]}'" for s in specs) + " (or the archives themselves)")
    srcs = [Path(p) for p in src]
    for p in srcs:
        if not p.exists():
            raise SegpromptError(f"--src '{p}' does not exist")
    known = set(all_names) | {n for s in specs for n in s.names}
    for p in srcs:
        if p.is_file() and p.name not in known:
            raise SegpromptError(
                f"--src '{p}' is not an archive {dataset} uses; it needs "
                + ", ".join(f"'{s.names[0]}'" for s in specs) + ". Pass those files, or the folder that holds them.")
    found: dict[str, Source] = {}
    for spec in specs:
        source = None
        for p in srcs:
            candidates = [p] if p.is_file() else [p / n for n in spec.names]
            for c in candidates:
                if c.is_file() and c.name in spec.names:
                    kind = _archive_kind(c)
                    if kind is None:
                        raise SegpromptError(f"'{c}' is neither a zip nor a tar archive")
                    source = Source(c, kind, spec)
                    break
            if source is not None:
                break
        if source is None:  # an extracted copy: a folder whose files match the spec's content
            for p in srcs:
                if p.is_dir():
                    folder = Source(p, "folder", spec)
                    if any(re.search(spec.marker, m) for m in folder.members()):
                        source = folder
                        break
        if source is None:
            how = f" ({spec.note})" if spec.note else ""
            raise SegpromptError(
                f"{dataset}: the {spec.role} archive '{spec.names[0]}' is not in "
                + ", ".join(f"'{p}'" for p in srcs)
                + f". It is published at {spec.url}{how}. segprompt never downloads: put the archive "
                f"there (or pass the folder where it is extracted) and run again.")
        if not any(re.search(spec.marker, m) for m in source.members()):
            raise SegpromptError(
                f"'{source.path}' holds no member like '{spec.example}': it is not the {spec.role} "
                f"archive of {dataset} ('{spec.names[0]}' from {spec.url}), or it is damaged.")
        found[spec.role] = source
    return found


def match_members(source: Source, pattern: str) -> list[tuple[str, re.Match]]:
    """Sorted members whose path matches ``pattern`` (``re.search``), with the match."""
    out = []
    for m in source.members():
        hit = re.search(pattern, m)
        if hit:
            out.append((m, hit))
    return out


# ------------------------------------------------------------------------------ decoding, mapping

def _check_whole(data: bytes, where: str) -> None:
    cut = truncated(data)
    if cut:  # OpenCV would decode it, the missing part grey
        raise SegpromptError(f"{where} is not a readable image ({cut}); the archive or copy is damaged")


def decode_image(data: bytes, where: str) -> np.ndarray:
    """A colour image as OpenCV gives it: HxWx3 uint8, **BGR** channel order."""
    _check_whole(data, where)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise SegpromptError(f"{where} is not a readable image (corrupt or truncated)")
    return img


def decode_rgb(data: bytes, where: str) -> np.ndarray:
    """A colour label image in **RGB** order (the order colour tables are written in here)."""
    return cv2.cvtColor(decode_image(data, where), cv2.COLOR_BGR2RGB)


def decode_index(data: bytes, where: str) -> np.ndarray:
    """A single-channel 8-bit index image (label ids), exactly as stored."""
    _check_whole(data, where)
    lbl = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if lbl is None:
        raise SegpromptError(f"{where} is not a readable image (corrupt or truncated)")
    if lbl.ndim != 2 or lbl.dtype != np.uint8:
        raise SegpromptError(f"{where} must be a single-channel 8-bit label image, got shape {lbl.shape} "
                             f"{lbl.dtype}: is it the right archive?")
    return lbl


def value_lut(mapping: dict[int, int], valid: Iterable[int]) -> np.ndarray:
    """256-entry table: ``mapping`` where given, 255 for other ``valid`` values, -1 = not allowed."""
    lut = np.full(256, -1, np.int16)
    lut[list(valid)] = IGNORE_INDEX
    for k, v in mapping.items():
        lut[k] = v
    return lut


def apply_lut(lbl: np.ndarray, lut: np.ndarray, where: str, what: str) -> np.ndarray:
    out = lut[lbl]
    if (out < 0).any():
        bad = np.unique(lbl[out < 0]).tolist()
        raise SegpromptError(f"{where} has label values {bad[:20]} that are not {what}: "
                             f"is it the right archive, or a damaged file?")
    return out.astype(np.uint8)


def apply_colour_table(rgb: np.ndarray, table: dict[tuple[int, int, int], int], where: str) -> np.ndarray:
    """Map an HxWx3 RGB label image through ``table`` (RGB -> id); any other colour is an error."""
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed.ravel(), return_inverse=True)
    keyed = {(r << 16) | (g << 8) | b: v for (r, g, b), v in table.items()}
    ids = np.array([keyed.get(int(c), -1) for c in colours], np.int16)
    if (ids < 0).any():
        bad = colours[ids < 0]
        counts = np.bincount(inverse, minlength=len(colours))[ids < 0]
        first = int(np.flatnonzero(np.isin(packed.ravel(), bad))[0])
        y, x = divmod(first, rgb.shape[1])
        listed = ", ".join(f"RGB({c >> 16},{(c >> 8) & 255},{c & 255}) x{n}"
                           for c, n in zip(bad[:8], counts[:8], strict=True))
        raise SegpromptError(f"{where} has colours outside the dataset's colour table: {listed} (first at "
                             f"x={x}, y={y}). The file is damaged or re-encoded lossily (e.g. JPEG), or it is "
                             f"not this dataset's ground truth.")
    return ids[inverse].reshape(rgb.shape[:2]).astype(np.uint8)


def encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise SegpromptError(f"could not encode a PNG of shape {img.shape}")
    return buf.tobytes()


# ------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Sample:
    split: str
    stem: str
    img_ext: str  # e.g. ".png", ".jpg"

    @property
    def image_name(self) -> str:
        return self.stem + self.img_ext

    def image(self, root: Path) -> Path:
        return root / IMG_DIR / self.split / self.image_name

    def label(self, root: Path) -> Path:
        return root / ANN_DIR / self.split / f"{self.stem}.png"


@dataclass(frozen=True)
class Job:
    """``fn(root, *args)`` writes ``samples`` and returns each one's label values (one list per sample)."""

    fn: Callable[..., list[list[int]]]  # a module-level function (pickled by reference)
    args: tuple
    samples: tuple[Sample, ...]

    def finished(self, root: Path) -> bool:
        return all(s.image(root).is_file() and s.label(root).is_file() for s in self.samples)


@dataclass
class Plan:
    dataset: str
    classes: list[str]
    palette: list[list[int]]
    jobs: list[Job]
    used: dict[str, list[str]]  # role -> members read (for folder fingerprints)
    facts: dict[str, Any] = field(default_factory=dict)  # dataset facts recorded in meta.extra

    def samples(self) -> list[Sample]:
        return [s for j in self.jobs for s in j.samples]


def write_sample(root: Path, sample: Sample, image: bytes | np.ndarray, label: np.ndarray,
                 num_classes: int, where: str) -> list[int]:
    """Check one converted sample and write it (image first, then label, each atomically).

    ``image``: the original file's bytes (kept as they are) or a BGR array (written as PNG).
    Returns the label values present.
    """
    shape = decode_image(image, where).shape[:2] if isinstance(image, bytes) else image.shape[:2]
    if shape != label.shape:
        raise SegpromptError(f"{where}: the image is {shape[1]}x{shape[0]} but its label is "
                             f"{label.shape[1]}x{label.shape[0]} (width x height); they must be equal")
    values = np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist()
    bad = [v for v in values if v >= num_classes and v != IGNORE_INDEX]
    if bad:  # the converter's own mapping went wrong: never write such a label
        raise SegpromptError(f"{where}: converted label values {bad} outside {{0..{num_classes - 1}, 255}}")
    atomic_write_bytes(sample.image(root), image if isinstance(image, bytes) else encode_png(image))
    atomic_write_bytes(sample.label(root), encode_png(label))
    return values


def verify_sample(root: Path, sample: Sample, num_classes: int) -> list[int]:
    """Re-read one written sample: both files decode, sizes agree, labels in {0..K-1, 255}."""
    img_path, lbl_path = sample.image(root), sample.label(root)
    img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
    if img is None:
        raise SegpromptError(f"image '{img_path}' is missing or does not decode")
    lbl = cv2.imread(str(lbl_path), cv2.IMREAD_UNCHANGED)
    if lbl is None:
        raise SegpromptError(f"label '{lbl_path}' is missing or does not decode")
    for kind, path in (("image", img_path), ("label", lbl_path)):
        cut = truncated_file(path)
        if cut:
            raise SegpromptError(f"{kind} '{path}' is cut short ({cut})")
    if lbl.ndim != 2 or lbl.dtype != np.uint8:
        raise SegpromptError(f"label '{lbl_path}' is not a single-channel 8-bit PNG ({lbl.shape}, {lbl.dtype})")
    if img.shape[:2] != lbl.shape:
        raise SegpromptError(f"image '{img_path}' is {img.shape[1]}x{img.shape[0]} but label '{lbl_path}' is "
                             f"{lbl.shape[1]}x{lbl.shape[0]}")
    values = np.flatnonzero(np.bincount(lbl.ravel(), minlength=256)).tolist()
    bad = [v for v in values if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        raise SegpromptError(f"label '{lbl_path}' has values {bad} outside {{0..{num_classes - 1}, 255}}")
    return values


# --------------------------------------------------------------------------------------- parallel

def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _call(fn: Callable, args: tuple) -> Any:
    return fn(*args)


def parallel_map(fn: Callable, items: Sequence[tuple], nproc: int, stage: str,
                 progress: Progress | None = None) -> list:
    """``[fn(*item) for item in items]`` over ``nproc`` processes, in order, reporting progress.

    The first error cancels what has not started and is raised as it is. ``fn`` must be a module-level
    function; a script that calls this with ``nproc > 1`` needs the usual ``if __name__ == "__main__":``
    guard (workers are started fresh, see below).
    """
    total, results = len(items), [None] * len(items)
    if total == 0:
        return results
    if progress:
        progress(stage, 0, total)
    if nproc <= 1 or total <= 1:
        for i, item in enumerate(items):
            results[i] = fn(*item)
            if progress:
                progress(stage, i + 1, total)
        return results
    # Workers start from a clean process (forkserver, else spawn), never by forking this one: a fork
    # taken while OpenCV's thread pool holds a lock deadlocks the child.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=min(nproc, total), initializer=_worker_init,
                             mp_context=multiprocessing.get_context(method)) as pool:
        futures = {pool.submit(_call, fn, item): i for i, item in enumerate(items)}
        pending, done_count = set(futures), 0
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    results[futures[f]] = f.result()  # raises the worker's error
                    done_count += 1
                if progress:
                    progress(stage, done_count, total)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _run_job(root: Path, job: Job) -> list[list[int]]:
    return job.fn(root, *job.args)


def _verify_job(root: Path, samples: tuple[Sample, ...], num_classes: int) -> list[list[int]]:
    return [verify_sample(root, s, num_classes) for s in samples]


def _check_sample(root: Path, sample: Sample, num_classes: int) -> tuple[list[int] | None, str | None]:
    try:
        return verify_sample(root, sample, num_classes), None
    except SegpromptError as e:
        return None, str(e)


# ---------------------------------------------------------------------------------- the folder

def move_aside(out: Path) -> Path:
    """Rename ``out`` to ``<out>.old-<timestamp>[-k]``: replaced data is kept, never deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, k = out.with_name(f"{out.name}.old-{stamp}"), 1
    while aside.exists():
        aside, k = out.with_name(f"{out.name}.old-{stamp}-{k}"), k + 1
    os.rename(out, aside)
    return aside


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
    from segprompt.data.class_prior import cached_class_prior

    prior = cached_class_prior(root, train_labels, num_classes, IGNORE_INDEX, PRIOR_RES)
    # The cache names its file by this key (segprompt/data/class_prior.py); recompute it to record the path.
    key = hashlib.sha256("\n".join(sorted(p.name for p in train_labels)).encode()).hexdigest()[:16]
    path = root / "class_prior" / f"prior_k{num_classes}_r{PRIOR_RES}_{key}.npy"
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
        return _run(dataset, specs, src, Path(out), options, build_plan, expected, all_names, nproc, force,
                    progress, log)
    finally:
        close_sources()


def _run(dataset: str, specs: Sequence[ArchiveSpec], src: Sequence[Path], out: Path, options: dict[str, Any],
         build_plan: Callable[[dict[str, Source]], Plan], expected: dict[str, int] | None, all_names: Sequence[str],
         nproc: int, force: bool, progress: Progress | None, log: Callable[[str], None] | None) -> DatasetMeta:
    sources = find_sources(dataset, specs, src, all_names)
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


# ----------------------------------------------------------------------------------------- check

def check(dataset: str, out: Path, *, nproc: int = 1, progress: Progress | None = None,
          max_problems: int = 20) -> DatasetMeta:
    """Re-verify a prepared folder: listed files exist and decode, counts, sizes, label values, prior."""
    out = Path(out)
    meta = read_meta(out, dataset)
    if meta.name != dataset:
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
                             + f"\nRe-run `segprompt prepare {dataset} --src ... --out {out}` to redo what is "
                               f"missing, or --force to redo everything.")
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


def golden_palette(n: int) -> list[list[int]]:
    """Distinct display colours (golden-ratio hues) where a dataset defines none."""
    import colorsys

    return [[round(255 * v) for v in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95 if i % 2 else 0.7)]
            for i in range(n)]


__all__ = ["ArchiveSpec", "Source", "Sample", "Job", "Plan", "find_sources", "match_members", "run", "check",
           "write_sample", "verify_sample", "parallel_map", "decode_image", "decode_rgb", "decode_index",
           "value_lut", "apply_lut", "apply_colour_table", "parse_counts", "split_by_order", "move_aside",
           "golden_palette", "IGNORE_INDEX", "CONVERTER_VERSION"]
