"""Deltas: what one task changed on top of a frozen backbone, in a file to share
(docs/api.md, "Deltas"; ``segprompt export RUN --format delta``).

A delta is a ``.safetensors`` file (no pickle: safe to open from anyone) holding exactly the
tensors a trainable-only checkpoint holds: trainable parameters (prompts, LoRA factors, biases,
the head) and the buffers that training updates (BatchNorm statistics where BatchNorm trains).
Its string metadata holds the rest of what loading needs: the recipe, the classes and palette,
and where the frozen weights come from with their SHA-256. Loaded with the backbone's weights
file (checked by that hash), it rebuilds exactly the model of the checkpoint it came from.
This is PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` in one file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from segprompt.errors import SegpromptError
from segprompt.io import atomic_write_bytes

FORMAT = "segprompt-delta/1"
SUFFIX = ".safetensors"
_JSON_FIELDS = ("config", "meta", "frozen_source")
_PLAIN_FIELDS = ("iteration", "cwd", "segprompt", "source", "source_sha256")


def is_delta(path: str | Path) -> bool:
    return Path(path).suffix.lower() == SUFFIX


def write_delta(path: str | Path, tensors: dict[str, torch.Tensor], **fields: Any) -> None:
    """Write ``tensors`` and ``fields`` (``config``, ``meta``, ``frozen_source`` as JSON; the rest as
    text) atomically to ``path``."""
    from safetensors.torch import save

    metadata = {"format": FORMAT}
    for key, value in fields.items():
        if value is not None:
            metadata[key] = json.dumps(value) if key in _JSON_FIELDS else str(value)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata))


def read_delta(path: str | Path) -> dict[str, Any]:
    """A delta as a checkpoint's contents: ``model`` (the tensors), ``config``, ``meta``,
    ``frozen_source``, ``iteration``; ``delta`` True."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SegpromptError(f"delta '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SegpromptError(f"delta '{path}' cannot be read as safetensors ({e}): it is truncated or not a "
                             f"file `segprompt export --format delta` wrote") from None
    if metadata.get("format") != FORMAT:
        raise SegpromptError(f"'{path}' is a safetensors file but not a segprompt delta (its metadata has format "
                             f"{metadata.get('format')!r}, not {FORMAT!r}); write one with "
                             f"`segprompt export RUN --format delta`")
    state: dict[str, Any] = {"model": tensors, "delta": True}
    try:
        for key in _JSON_FIELDS:
            state[key] = json.loads(metadata[key]) if key in metadata else None
    except json.JSONDecodeError as e:
        raise SegpromptError(f"delta '{path}': its metadata '{key}' is not valid JSON ({e})") from None
    if not isinstance(state["config"], dict):
        raise SegpromptError(f"delta '{path}' holds no recipe in its metadata; write it again with "
                             f"`segprompt export RUN --format delta`")
    for key in _PLAIN_FIELDS:
        if key in metadata:
            state[key] = int(metadata[key]) if key == "iteration" else metadata[key]
    return state
