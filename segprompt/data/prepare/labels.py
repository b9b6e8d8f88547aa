"""Decoding images and labels and remapping label values into train IDs 0..K-1 with 255 = ignore,
once, at prepare time (``docs/datasets.md``, "The prepared layout and its rules")."""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from segprompt.data.pixel_limit import over_limit
from segprompt.data.truncation import truncated
from segprompt.errors import SegpromptError

IGNORE_INDEX = 255


def _check_whole(data: bytes, where: str) -> None:
    cut = truncated(data)
    if cut:  # OpenCV would decode it, the missing part grey
        raise SegpromptError(f"{where} is not a readable image ({cut}); the archive or copy is damaged")
    too_big = over_limit(data)  # from the header, before decoding (docs/runs.md, "Limits")
    if too_big:
        raise SegpromptError(f"{where} is refused: {too_big}")


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
