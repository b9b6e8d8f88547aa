"""The official archives a converter reads: :class:`Source` reads the members of a zip, a tar (plain
or gzipped) or an already-extracted folder through one interface (and inflates gzipped members such
as STARE's ``.ppm.gz`` on request); :func:`find_sources` picks each archive by its official name,
never by globbing, and names the archive and its publisher when one is missing (``docs/datasets.md``)."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segprompt.errors import SegpromptError
from segprompt.io import sha256_file


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
