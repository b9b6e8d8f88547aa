"""The pixel limit: an image over it is refused from its header, before it is decoded (docs/runs.md,
"Limits"). A 109 KB PNG can declare 30000 x 30000 pixels: decoded, 2.7 GB; segmented, tens of GB of
logits. The default is Pillow's own limit (89,478,485 pixels, about 9459 x 9459);
``SEGPROMPT_MAX_PIXELS`` changes it (0: no limit). predict, training, eval and prepare all check it.

Pillow reads the size: ``Image.open`` parses only the header (PNG, JPEG, BMP, TIFF, PPM, ...), and it
is installed with torchvision. We never let Pillow decode here, so its own bomb check never fires.
"""

from __future__ import annotations

import io
import os

from segprompt.errors import SegpromptError

ENV = "SEGPROMPT_MAX_PIXELS"
DEFAULT = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3


def max_pixels() -> int | None:
    """The limit in pixels, or None for none (``SEGPROMPT_MAX_PIXELS=0``)."""
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():
        return DEFAULT
    try:
        value = int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        raise SegpromptError(f"{ENV}={raw!r} is not a number of pixels (e.g. 100000000; 0 for no limit)") from None
    if value < 0:
        raise SegpromptError(f"{ENV}={raw!r} must be 0 (no limit) or a positive number of pixels")
    return value or None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header, or None when Pillow cannot parse one."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # Pillow's own check would refuse at open(), hiding the size we report
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - not an image Pillow knows: the decoder reports it later
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def over_limit(data: bytes) -> str | None:
    """Why ``data`` is refused (it declares more pixels than the limit), or None."""
    limit = max_pixels()
    size = header_size(data) if limit else None
    if size is None or size[0] * size[1] <= limit:
        return None
    return (f"it declares {size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, over the limit of {limit:,} "
            f"(set {ENV} to raise it, 0 for none)")
