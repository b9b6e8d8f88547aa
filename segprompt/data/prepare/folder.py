"""``segprompt prepare folder``: your own images and masks, two plain folders, in the prepared layout
(``docs/datasets.md``, "Your own data").

- Images and masks are paired by file stem (``--mask-suffix`` when a mask's name adds one, e.g.
  ``_mask``). Splits come from sub-folders of the same names in both folders (``train/``, ``val/``,
  ...), or from a seeded random split of one flat folder (``--val-fraction``).
- Masks are lossless images: index masks (``--mask-format index``, single-channel values 0..K-1, or a
  palette PNG whose indices are the values) or colour masks (``--mask-format rgb``, mapped through
  the palette). ``--ignore-index`` names the value that means "unlabelled" (stored as 255);
  ``--reduce-zero-label`` reads 0 as unlabelled and shifts 1..K down to 0..K-1.
- Unpaired files, two files with one stem, an image and mask of different sizes and values outside
  the classes are errors that name the file. The user's folders are only read, never changed.
- The conversion itself is the official converters' (:func:`~segprompt.data.prepare.runner.convert`):
  atomic writes, ``meta.json`` last, idempotent, ``--check`` on its output.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from segprompt.data.meta import (
    META_FILE,
    DatasetMeta,
    golden_palette,
    read_meta,
    shared_stem,
)
from segprompt.data.pixel_limit import over_limit
from segprompt.data.prepare.archive import ArchiveSpec, Source
from segprompt.data.prepare.labels import IGNORE_INDEX, apply_colour_table, value_lut
from segprompt.data.prepare.runner import CONVERTER_VERSION, STATE_FILE, convert
from segprompt.data.prepare.samples import (
    IMAGE_EXTS,
    Job,
    Plan,
    Progress,
    Sample,
    write_sample,
)
from segprompt.errors import SegpromptError

NAME = "folder"
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff")  # lossless only: a JPEG mask has smeared label values
MASK_FORMATS = ("index", "rgb")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def parse_classes(classes: str | None, classes_file: Path | None) -> tuple[list[str], list[list[int]] | None]:
    """``--classes a,b,c``, or ``--classes-file F``: one class per line, optionally followed by its
    colour as three numbers (``road 128 64 128``); blank lines and ``#`` comments are skipped."""
    if (classes is None) == (classes_file is None):
        raise SegpromptError("name the classes with --classes a,b,c or --classes-file FILE (one of the two)")
    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
        return _checked_names(names, "--classes"), None
    try:
        lines = Path(classes_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SegpromptError(f"--classes-file '{classes_file}' cannot be read: {e}") from None
    names, colours = [], []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) not in (1, 4):
            raise SegpromptError(f"--classes-file '{classes_file}' line {n}: write a class name, optionally "
                                 f"followed by R G B (e.g. 'road 128 64 128'), not '{line}'")
        names.append(parts[0])
        if len(parts) == 4:
            colours.append(_colour(parts[1:], f"--classes-file '{classes_file}' line {n}"))
    if colours and len(colours) != len(names):
        raise SegpromptError(f"--classes-file '{classes_file}': give a colour on every line or on none "
                             f"({len(colours)} of {len(names)} lines have one)")
    return _checked_names(names, f"--classes-file '{classes_file}'"), colours or None


def parse_palette(text: str, n: int) -> list[list[int]]:
    """``--palette "0,0,0;128,0,0;..."``: one R,G,B per class, in class order."""
    colours = [_colour(c.split(","), "--palette") for c in text.split(";") if c.strip()]
    if len(colours) != n:
        raise SegpromptError(f"--palette has {len(colours)} colours for {n} classes; give one R,G,B per class, "
                             f"separated by ';'")
    return colours


def _colour(parts: list[str], where: str) -> list[int]:
    try:
        rgb = [int(p) for p in parts]
    except ValueError:
        rgb = []
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise SegpromptError(f"{where}: '{' '.join(parts)}' is not a colour; write three numbers 0..255")
    return rgb


def _checked_names(names: list[str], where: str) -> list[str]:
    if any(not n for n in names):
        raise SegpromptError(f"{where}: a class name is empty")
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise SegpromptError(f"{where}: class '{dup[0]}' is named twice")
    if not 2 <= len(names) <= 255:
        raise SegpromptError(f"{where}: {len(names)} classes; segmentation needs 2 to 255 (255 is 'ignore')")
    return names


def _files(folder: Path, exts: tuple[str, ...], what: str) -> tuple[dict[str, Path], list[Path]]:
    """stem -> file of one split folder (files with other suffixes are returned apart); two files with
    one stem are an error naming both."""
    files = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and not p.is_dir()]
    ours = [p for p in files if p.suffix.lower() in exts]
    twins = shared_stem(ours)
    if twins:
        raise SegpromptError(f"{what} '{twins[0]}' and '{twins[1]}' share the stem '{twins[1].stem}'; keep one "
                             f"of them (a sample is named by its stem)")
    return {p.stem: p for p in ours}, [p for p in files if p.suffix.lower() not in exts]


def _split_folders(images: Path, masks: Path) -> dict[str, tuple[Path, Path]] | None:
    """split -> (image folder, mask folder) when ``images`` holds split sub-folders; None when flat."""
    subs = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = [p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if not subs:
        return None
    if flat:
        raise SegpromptError(f"--images '{images}' holds both images (e.g. '{flat[0].name}') and sub-folders "
                             f"({', '.join(subs)}); use split sub-folders only, or one flat folder")
    if "train" not in subs:
        raise SegpromptError(f"--images '{images}' has sub-folders {', '.join(subs)} but no 'train/'; name the "
                             f"split folders train/, val/ (and test/)")
    bad = [s for s in subs if not SPLIT_NAME.fullmatch(s)]
    if bad:
        raise SegpromptError(f"--images '{images}': sub-folder '{bad[0]}' is not a split name (letters, digits, "
                             f"'_' and '-')")
    missing = [s for s in subs if not (masks / s).is_dir()]
    if missing:
        raise SegpromptError(f"--masks '{masks}' has no '{missing[0]}/' sub-folder, but --images has one; "
                             f"masks need the same split folders as images")
    extra = sorted(p.name for p in masks.iterdir() if p.is_dir() and p.name not in subs
                   and not p.name.startswith("."))
    if extra:
        raise SegpromptError(f"--masks '{masks}' has a sub-folder '{extra[0]}/' that --images '{images}' lacks")
    return {s: (images / s, masks / s) for s in subs}


def _random_split(stems: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """stem -> 'train' | 'val': a seeded permutation of the sorted stems, ``round(f * n)`` to val."""
    n_val = round(val_fraction * len(stems))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= len(stems):
        raise SegpromptError(f"--val-fraction {val_fraction} leaves no training image of {len(stems)}; "
                             f"use a smaller fraction")
    order = np.random.default_rng(seed).permutation(len(stems))
    val = {stems[i] for i in order[:n_val]}
    return {s: "val" if s in val else "train" for s in stems}


def pair(images: Path, masks: Path, mask_suffix: str, val_fraction: float | None,
         seed: int) -> tuple[list[tuple[Sample, Path, Path]], list[Path]]:
    """Every (sample, image, mask) of the two folders, and the files skipped as not images."""
    for flag, folder in (("--images", images), ("--masks", masks)):
        if not folder.is_dir():
            raise SegpromptError(f"{flag} '{folder}' is not a folder")
    splits = _split_folders(images, masks)
    if splits is not None and val_fraction is not None:
        raise SegpromptError(f"--images '{images}' already has split sub-folders ({', '.join(splits)}); drop "
                             f"--val-fraction, or give one flat folder")
    if splits is None:
        if val_fraction is None:
            raise SegpromptError(f"--images '{images}' is one flat folder: pass --val-fraction F (e.g. 0.2) to "
                                 f"hold out a seeded random validation split, or arrange train/ and val/ "
                                 f"sub-folders in both --images and --masks")
        if not 0 <= val_fraction < 1:
            raise SegpromptError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        splits = {"": (images, masks)}
    found, skipped = [], []
    for split, (img_dir, mask_dir) in splits.items():
        imgs, other_i = _files(img_dir, IMAGE_EXTS, "images")
        msks, other_m = _files(mask_dir, MASK_EXTS + tuple(e for e in IMAGE_EXTS if e not in MASK_EXTS), "masks")
        lossy = [p for p in msks.values() if p.suffix.lower() not in MASK_EXTS]
        if lossy:
            raise SegpromptError(f"mask '{lossy[0]}' is a {lossy[0].suffix} file: lossy compression smears label "
                                 f"values; save masks as PNG ({', '.join(MASK_EXTS)} are read)")
        skipped += other_i + other_m
        by_image = {}
        for stem, mask in msks.items():
            if not stem.endswith(mask_suffix):
                raise SegpromptError(f"mask '{mask}' does not end in --mask-suffix '{mask_suffix}'")
            by_image[stem[:len(stem) - len(mask_suffix)] if mask_suffix else stem] = mask
        lone = sorted(set(imgs) - set(by_image))
        if lone:
            raise SegpromptError(f"image '{imgs[lone[0]]}' has no mask: expected "
                                 f"'{mask_dir / (lone[0] + mask_suffix)}.png' ({len(lone)} unpaired image(s))")
        lone = sorted(set(by_image) - set(imgs))
        if lone:
            raise SegpromptError(f"mask '{by_image[lone[0]]}' has no image '{img_dir / lone[0]}.*' (pairs are "
                                 f"matched by file stem{', after removing --mask-suffix' if mask_suffix else ''}; "
                                 f"{len(lone)} unpaired mask(s))")
        if not imgs:
            raise SegpromptError(f"'{img_dir}' holds no images ({', '.join(IMAGE_EXTS)})")
        split_of = ({s: split for s in imgs} if split else
                    _random_split(sorted(imgs), val_fraction or 0.0, seed))
        found += [(Sample(split_of[s], s, imgs[s].suffix.lower()), imgs[s], by_image[s]) for s in sorted(imgs)]
    return found, skipped


def _convert_one(root: Path, sample: Sample, image: Path, mask: Path, classes: int,
                 palette: list[list[int]] | None, lut: np.ndarray | None) -> list[list[int]]:
    where = f"'{image}' / '{mask}'"
    try:
        data, mask_data = image.read_bytes(), mask.read_bytes()
    except OSError as e:
        raise SegpromptError(f"cannot read {where}: {e}") from None
    label = read_mask(mask_data, f"mask '{mask}'", palette if lut is None else None, lut, classes)
    return [write_sample(root, sample, data, label, classes, where)]


def read_mask(data: bytes, where: str, palette: list[list[int]] | None, lut: np.ndarray | None,
              classes: int) -> np.ndarray:
    """One mask as train IDs: through ``lut`` (index masks) or the ``palette`` (colour masks).

    Pillow reads it, not OpenCV: OpenCV expands a palette PNG (VOC-style masks) into colours and
    loses the indices, which are the labels."""
    from PIL import Image, UnidentifiedImageError

    too_big = over_limit(data)
    if too_big:
        raise SegpromptError(f"{where} is refused: {too_big}")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise SegpromptError(f"{where} is not a readable image ({e})") from None
    if lut is not None:
        if img.mode not in ("L", "P", "I", "I;16", "1"):
            raise SegpromptError(f"{where} is a {img.mode} colour image, not an index mask; pass --mask-format rgb "
                                 f"with the classes' colours, or save single-channel masks")
        values = np.asarray(img)
        if values.max(initial=0) > 255 or values.min(initial=0) < 0:
            raise SegpromptError(f"{where} has values up to {int(values.max())}; index masks hold 0..255")
        out = lut[values.astype(np.uint8)]
        if (out < 0).any():
            bad = np.unique(values[out < 0]).tolist()
            raise SegpromptError(f"{where} has values {bad[:20]} that are neither a class (0..{classes - 1} for the "
                                 f"{classes} classes given) nor the ignore value: check the class list, "
                                 f"--reduce-zero-label (masks with 1..K) and --ignore-index")
        return out.astype(np.uint8)
    rgb = np.asarray(img.convert("RGB"))
    return apply_colour_table(rgb, {tuple(c): i for i, c in enumerate(palette or [])}, where)


def _listing(pairs: list[tuple[Sample, Path, Path]]) -> str:
    """A cheap fingerprint of the user's files (names, sizes, modification times): an unchanged
    listing on a rerun means nothing to redo."""
    h = hashlib.sha256()
    for sample, img, mask in pairs:
        for p in (img, mask):
            st = p.stat()
            h.update(f"{sample.split}\0{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _refuse_changed(out: Path, options: dict[str, Any], force: bool) -> None:
    """Files added to, removed from or edited in the user's folders since ``out`` was prepared: say so
    (the generic rerun check would call it 'other options')."""
    if force or not (out / META_FILE).is_file() or (out / STATE_FILE).is_file():
        return
    try:
        before = read_meta(out, NAME).extra.get("options") or {}
    except SegpromptError:
        return
    if {k: v for k, v in before.items() if k != "listing"} == {k: v for k, v in options.items() if k != "listing"} \
            and before.get("listing") != options["listing"]:
        raise SegpromptError(f"files in --images/--masks were added, removed or changed since '{out}' was prepared "
                             f"from them; pass --force to prepare it again (the old folder is kept as "
                             f"'{out.name}.old-<timestamp>'), or another --out")


def _inside(a: Path, b: Path) -> bool:
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or b in a.parents


def prepare_folder(images: Path, masks: Path, out: Path, *, classes: list[str],
                   palette: list[list[int]] | None = None, mask_format: str = "index", mask_suffix: str = "",
                   ignore_index: int | None = IGNORE_INDEX, reduce_zero_label: bool = False,
                   val_fraction: float | None = None, seed: int = 0, nproc: int = 1, force: bool = False,
                   progress: Progress | None = None, log=None) -> DatasetMeta:
    """Pair, check and convert two plain folders into the prepared layout at ``out`` (module docstring).

    ``ignore_index`` None: index masks have no "unlabelled" value."""
    images, masks, out = Path(images), Path(masks), Path(out)
    for flag, folder in (("--images", images), ("--masks", masks)):
        if folder.exists() and (_inside(out, folder) or _inside(folder, out)):
            raise SegpromptError(f"--out '{out}' and {flag} '{folder}' overlap; prepare writes a new folder and "
                                 f"never into yours: pass an --out outside it")
    if mask_format not in MASK_FORMATS:
        raise SegpromptError(f"--mask-format '{mask_format}': use one of {', '.join(MASK_FORMATS)}")
    if mask_format == "rgb":
        if palette is None:
            raise SegpromptError("--mask-format rgb maps each mask colour to a class: give the colours with "
                                 "--palette 'R,G,B;...' or in --classes-file ('name R G B' per line)")
        if reduce_zero_label or ignore_index != IGNORE_INDEX:
            raise SegpromptError("--reduce-zero-label and --ignore-index apply to index masks; colour masks map "
                                 "every colour through the palette")
        if len({tuple(c) for c in palette}) != len(palette):
            raise SegpromptError("two classes share one colour in the palette; colour masks need distinct colours")
    lut = None
    if mask_format == "index":
        if ignore_index is not None and not 0 <= ignore_index <= 255:
            raise SegpromptError(f"--ignore-index must be in 0..255 (or -1 for none), got {ignore_index}")
        lut = _index_lut(len(classes), ignore_index, reduce_zero_label)
    pairs, skipped = pair(images, masks, mask_suffix, val_fraction, seed)
    if log and skipped:
        log(f"skipped {len(skipped)} file(s) that are not images, e.g. '{skipped[0]}'")
    options = {"images": str(images.resolve()), "masks": str(masks.resolve()), "classes": classes,
               "palette": palette, "mask_format": mask_format, "mask_suffix": mask_suffix,
               "ignore_index": ignore_index, "reduce_zero_label": reduce_zero_label,
               "val_fraction": val_fraction, "seed": seed if val_fraction is not None else None,
               "listing": _listing(pairs)}
    _refuse_changed(out, {"converter_version": CONVERTER_VERSION, **options}, force)
    sources = {"images": Source(images, "folder", ArchiveSpec("images", (images.name,), r".", "", "--images")),
               "masks": Source(masks, "folder", ArchiveSpec("masks", (masks.name,), r".", "", "--masks"))}
    colours = palette or golden_palette(len(classes))

    def build_plan(_: dict[str, Source]) -> Plan:
        jobs = [Job(_convert_one, (sample, img, mask, len(classes), palette, lut), (sample,))
                for sample, img, mask in pairs]
        used = {"images": [p[1].relative_to(images).as_posix() for p in pairs],
                "masks": [p[2].relative_to(masks).as_posix() for p in pairs]}
        split_rule = ("sub-folders" if val_fraction is None
                      else f"seeded random: {val_fraction} of the sorted stems to val (seed {seed})")
        return Plan(NAME, list(classes), colours, jobs, used, facts={"split_rule": split_rule})

    meta = convert(NAME, sources, out, options, build_plan, None, nproc=nproc, force=force, progress=progress,
                   log=log)
    _warn_absent(meta, log)
    return meta


def _index_lut(k: int, ignore_index: int | None, reduce_zero_label: bool) -> np.ndarray:
    """Stored value -> train ID (255 = ignore): identity on 0..K-1, or 0 -> 255 and v -> v-1 with
    ``reduce_zero_label``; the ignore value -> 255."""
    mapping = {v + 1: v for v in range(k)} if reduce_zero_label else {v: v for v in range(k)}
    if reduce_zero_label:
        mapping[0] = IGNORE_INDEX
    if ignore_index is not None:
        if ignore_index in mapping and mapping[ignore_index] != IGNORE_INDEX:
            raise SegpromptError(f"--ignore-index {ignore_index} is also the value of class "
                                 f"{mapping[ignore_index]}; pick a value no class uses (255 is usual)")
        mapping[ignore_index] = IGNORE_INDEX
    return value_lut(mapping, [])


def _warn_absent(meta: DatasetMeta, log) -> None:
    """A class no training mask holds is most often a mask convention mismatch (0/255 binary masks
    read with 255 = ignore; 1..K read without --reduce-zero-label): say it once."""
    present = set(meta.label_values.get("train", []))
    absent = [c for i, c in enumerate(meta.classes) if i not in present]
    if absent and log:
        log(f"warning: no training mask holds the class(es) {', '.join(absent)}. If your masks store them as "
            f"other values (e.g. 255 for the foreground of a binary mask, which --ignore-index 255 reads as "
            f"unlabelled), re-run with --force and the right --ignore-index / --reduce-zero-label")
