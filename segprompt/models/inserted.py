"""The interface of a module a tuning method inserts into a model and registers with it
(:meth:`segprompt.models.segmentor.EncoderDecoder.insert`), e.g. the SPM chain (docs/spm.md).

The segmentor, the training loop and evaluation talk to registered modules only through these
methods; each has a default that does nothing, so a module overrides what it takes part in.
"""

from __future__ import annotations

import torch
from torch import nn


class Inserted(nn.Module):
    """A registered inserted module.

    - :meth:`losses`: extra loss terms of the last training forward (e.g. SPM's interim maps, Eq. 5).
    - :meth:`diagnostics`: numbers logged with each training record (``metrics.jsonl``).
    - :meth:`set_view`: the part of the original image the input covers, before the backbone runs
      (``None`` afterwards; :mod:`segprompt.data.view`).
    - :meth:`capture`: while on, evaluation forwards keep each slot's interim map in
      :attr:`captured` (slot -> B x K x h x w), which evaluation scores (docs/spm.md, "Diagnostics").
    """

    def __init__(self) -> None:
        super().__init__()
        self.captured: dict[int, torch.Tensor] = {}

    def losses(self, label: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def diagnostics(self) -> dict[str, float]:
        return {}

    def set_view(self, view: torch.Tensor | None) -> None:
        return None

    def capture(self, on: bool) -> None:
        """Start (``True``) or stop keeping interim maps; either way :attr:`captured` is emptied."""
        self.captured = {}
