"""Is an encoded image complete? OpenCV decodes a JPEG cut off mid-file without complaint (the
missing rows come out grey) and a PNG cut after its pixel data without noticing; both end with a
fixed marker, so a cut file is cheap to detect from its last bytes."""

from __future__ import annotations

import os

_TAIL = 4096  # the end markers are looked for in this many last bytes

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"  # SOI (+ the next marker's FF), EOI
PNG_START = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk with its CRC


def truncated(data: bytes) -> str | None:
    """Why a JPEG or PNG ``data`` is cut short (its end marker is missing from its last
    ``_TAIL`` bytes), or None when it is whole or another format. Bytes after the marker (padding,
    a camera's trailer) are allowed; compressed JPEG data never holds FFD9 (an FF there is
    followed by 00 or a restart marker), so past the first few KiB (an EXIF thumbnail's own
    marker) only the end-of-image marker matches."""
    tail = data[-_TAIL:]
    if data.startswith(JPEG_START) and JPEG_END not in tail:
        return "truncated JPEG: no end-of-image marker (FFD9)"
    if data.startswith(PNG_START) and PNG_END not in tail:
        return "truncated PNG: no IEND chunk at the end"
    return None


def truncated_file(path: str | os.PathLike) -> str | None:
    """:func:`truncated` for a file, reading only its first and last bytes."""
    with open(path, "rb") as f:
        head = f.read(len(PNG_START))
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - _TAIL, len(head)))
        return truncated(head + f.read())
