"""Views: which part of the original image an input tensor covers (docs/spm.md, "M0 follows the image").

A view is a float tensor of shape (B, 5), one row ``(y0, x0, y1, x1, flipped)`` per input: the
input covers the box ``[y0, y1] x [x0, x1]`` of the original image in normalised coordinates
(0..1 from the top/left edge to the bottom/right edge; a box may extend past [0, 1] where the
input does, e.g. the padded part of a training crop or of the last sliding window), and
``flipped = 1`` when the input is the horizontal mirror of that box. A resize changes no view;
the identity view ``(0, 0, 1, 1, 0)`` is the whole image as it is.

Input position ``t`` in 0..1 (top/left to bottom/right of the input) lies at original
``y = y0 + t (y1 - y0)`` and ``x = x0 + t (x1 - x0)``, or ``x = x1 - t (x1 - x0)`` when flipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["IDENTITY", "identity_view", "is_identity", "sub_view", "view_theta"]

IDENTITY = (0.0, 0.0, 1.0, 1.0, 0.0)


def identity_view(batch: int, device: torch.device | str | None = None, flipped: bool = False) -> Tensor:
    """(batch, 5) float32 views of the whole image, mirrored when ``flipped``."""
    row = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0 if flipped else 0.0], dtype=torch.float32, device=device)
    return row.expand(batch, 5).clone()


def is_identity(view: Tensor) -> Tensor:
    """(B,) bool: which rows are exactly the identity view."""
    return (view == view.new_tensor(IDENTITY)).all(dim=-1)


def sub_view(view: Tensor, box: Sequence[float]) -> Tensor:
    """The view of a part of an input: ``box = (y0, x0, y1, x1)`` in the input's own normalised
    coordinates (may extend past [0, 1]); ``view`` (B, 5) is the input's view. The part inherits the
    input's flip: the part at the input's left is at the original's right when the input is mirrored."""
    by0, bx0, by1, bx1 = (float(v) for v in box)
    y0, x0, y1, x1, f = view.unbind(-1)
    hy, wx = y1 - y0, x1 - x0
    ny0, ny1 = y0 + by0 * hy, y0 + by1 * hy
    flipped = f > 0.5
    nx0 = torch.where(flipped, x1 - bx1 * wx, x0 + bx0 * wx)
    nx1 = torch.where(flipped, x1 - bx0 * wx, x0 + bx1 * wx)
    return torch.stack([ny0, nx0, ny1, nx1, f], dim=-1)


def view_theta(view: Tensor) -> Tensor:
    """(B, 2, 3) ``F.affine_grid`` matrices that map an input's pixel positions ``u`` in [-1, 1]
    (align_corners=False) to the original image's grid coordinates ``g`` in [-1, 1]:
    ``g_x = ±(x1 - x0) u_x + (x0 + x1 - 1)`` (minus when flipped), ``g_y = (y1 - y0) u_y + (y0 + y1 - 1)``."""
    y0, x0, y1, x1, f = view.unbind(-1)
    sign = 1.0 - 2.0 * (f > 0.5).to(view.dtype)
    zero = torch.zeros_like(y0)
    row_x = torch.stack([sign * (x1 - x0), zero, x0 + x1 - 1.0], dim=-1)
    row_y = torch.stack([zero, y1 - y0, y0 + y1 - 1.0], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)
