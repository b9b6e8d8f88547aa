"""Checkpoints: what training changed, plus everything needed to resume bit-exactly.

By default a checkpoint stores only the trainable parameters and the buffers that training
updates (those of modules in training mode, so the statistics of frozen BatchNorm layers are
left out), together with a reference to where the frozen weights come from: the pretrained
file and its SHA-256, or the seed the model was initialised with, and, for a run started with
``--load-from`` (e.g. the STDC paper's second stage on top of the first), that initial checkpoint
and its SHA-256: frozen weights are rebuilt by loading the pretrained file, then the initial
checkpoint. ``checkpoint.save_full_model`` stores the whole model instead. Every write is atomic (:mod:`segprompt.io`).

``--load-from`` takes a segprompt checkpoint, an MMSegmentation one (``state_dict``) or a bare
state dict (timm, torchvision) and refuses a file that supplies fewer than
:data:`LOAD_FROM_MIN_SHARE` of the model's tensors, unless ``--load-from-partial`` says a partial
load is meant, and one that supplies none in any case: a file that matches nothing would otherwise
train from scratch without a word.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segprompt.errors import SegpromptError, torch_load_reason
from segprompt.io import atomic_torch_save, sha256_file

# --load-from: the least share of the model's tensors (state-dict entries, BatchNorm's
# num_batches_tracked counters not counted) the file must supply. The STDC second stage supplies
# about 60% (its frozen CLIP text encoder comes from its own file); a foreign file supplies ~0%.
LOAD_FROM_MIN_SHARE = 0.5
# what `segprompt train` writes (what eval and --resume read)
CONTENTS = ("a dict of 'model' (name -> tensor), 'iteration', 'config' and, for resuming, 'optimizer', "
            "'scheduler', 'scaler', 'rng', written by `segprompt train` to RUN/checkpoints/")
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "iteration", "best", "rng")


def changed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and the buffers of modules that are in training mode."""
    was_training = model.training
    model.train()
    live = {id(m) for m in model.modules() if m.training}
    state: dict[str, torch.Tensor] = {}
    for mod_name, m in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for n, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                state[prefix + n] = p.detach().clone()
        if id(m) in live:
            for n, b in m.named_buffers(recurse=False):
                if b is not None and n not in m._non_persistent_buffers_set:
                    state[prefix + n] = b.detach().clone()
    model.train(was_training)
    return state


def model_state(model: nn.Module, full: bool) -> dict[str, torch.Tensor]:
    if full:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return changed_state_dict(model)


def frozen_source(pretrained: str | None, seed: int, init: str | Path | None = None) -> dict[str, Any]:
    if pretrained:
        src = {"type": "file", "path": str(Path(pretrained).resolve()), "sha256": sha256_file(pretrained)}
    else:
        src = {"type": "seed", "seed": seed}
    if init is not None:
        src["init"] = {"path": str(Path(init).resolve()), "sha256": sha256_file(init)}
    return src


def travel_record(meta: Any) -> dict[str, Any]:
    """What a checkpoint stores so that its run works away from its dataset and folder
    (docs/runs.md, "Runs that travel"): the classes, palette and ignore index (``meta``) and the
    folder training ran in (``cwd``, against which the recipe's relative paths resolve)."""
    return {"meta": meta.portable(), "cwd": os.getcwd()}


def init_tensors(state: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``--load-from`` file: segprompt's ``model``, MMSegmentation's ``state_dict``,
    or a bare state dict (timm, torchvision)."""
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise SegpromptError(f"--load-from '{path}' holds no weights segprompt can read: it takes a segprompt "
                             f"checkpoint ('model'), an MMSegmentation one ('state_dict') or a state dict of "
                             f"tensors (timm, torchvision)")
    return state


def load_init(model: nn.Module, path: str | Path, *, partial: bool = False
              ) -> tuple[int, int, list[str], list[str]]:
    """Initialise ``model`` from a checkpoint's weights, as MMSegmentation's ``load_from`` does
    (non-strict). Unless ``partial``, the file must supply :data:`LOAD_FROM_MIN_SHARE` of the
    model's tensors, each of the model's shape. With ``partial`` a tensor of another shape (a head
    for other classes) keeps its initial value. Returns (tensors loaded, the model's tensors, the
    file's tensors this model does not have, the model's tensors left at their initial value
    because the file's have another shape), ``num_batches_tracked`` not counted."""
    state = init_tensors(load_checkpoint(path), path)
    own = model.state_dict()
    counted = [k for k in own if not k.endswith("num_batches_tracked")]
    reshaped = [k for k in counted if k in state and state[k].shape != own[k].shape]
    if reshaped and not partial:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in reshaped[:4])
        raise SegpromptError(
            f"--load-from '{path}' has {len(reshaped)} tensor(s) of other shapes than this model's (e.g. {shown}); "
            f"a run on other classes has another head and other class-sized layers. Add --load-from-partial to load "
            f"every tensor that matches and start these from their initial values")
    matched = [k for k in counted if k in state and k not in reshaped]
    if not partial and len(matched) < LOAD_FROM_MIN_SHARE * len(counted):
        missing = [k for k in counted if k not in state]
        raise SegpromptError(
            f"--load-from '{path}' supplies {len(matched)} of this model's {len(counted)} tensors (fewer than "
            f"{LOAD_FROM_MIN_SHARE:.0%}): missing e.g. {missing[:4]}; the file holds e.g. {sorted(state)[:4]}. "
            f"Pass a checkpoint of this recipe's model, or add --load-from-partial to load the {len(matched)} "
            f"that match on purpose")
    if not matched:  # partial or not: loading nothing would train from scratch under a --load-from
        raise SegpromptError(
            f"--load-from '{path}' supplies none of this model's {len(counted)} tensors, so nothing would be "
            f"loaded (--load-from-partial allows a partial load, not an empty one): the model has e.g. "
            f"{counted[:3]}, the file e.g. {sorted(state)[:3]}. Pass a checkpoint of this recipe's model, or drop "
            f"--load-from to train from scratch")
    dropped = sorted(k for k in state if k not in own)
    load_model_state(model, {k: v for k, v in state.items() if k in own and k not in reshaped}, str(path),
                     allow_partial=True)
    return len(matched), len(counted), dropped, reshaped


def restore_frozen(model: nn.Module, ckpt: dict, where: str) -> None:
    """Before loading a trainable-only checkpoint of a ``--load-from`` run: load the initial
    checkpoint its frozen weights came from (after checking it is the same file)."""
    path = frozen_init(ckpt, where)
    if path is not None:
        load_init(model, path, partial=True)  # accepted (or meant partial) when the run started


def frozen_init(ckpt: dict, where: str) -> Path | None:
    """The initial checkpoint (``--load-from``) a trainable-only checkpoint's frozen weights come
    from, checked to be the same file by its SHA-256; ``None`` if there is none."""
    init = ckpt.get("frozen_source", {}).get("init")
    if ckpt.get("full_model") or not init:
        return None
    path = Path(init["path"])
    if not path.is_file():
        raise SegpromptError(f"checkpoint '{where}' stores only the trained parameters; its frozen weights come "
                             f"from the initial checkpoint '{path}' (--load-from), which is gone. Put it back there")
    if sha256_file(path) != init["sha256"]:
        raise SegpromptError(f"checkpoint '{where}' was initialised from '{path}' (sha256 {init['sha256'][:12]}...), "
                             f"but that file has changed; restore the original")
    return path


def check_frozen_source(ckpt: dict, pretrained: str | None, where: str) -> None:
    """A trainable-only checkpoint is only valid on top of the same frozen weights."""
    src = ckpt.get("frozen_source", {})
    if ckpt.get("full_model") or src.get("type") != "file":
        return
    if not pretrained or not Path(pretrained).is_file():
        raise SegpromptError(
            f"checkpoint '{where}' stores only the trained parameters; its frozen weights come from "
            f"'{src['path']}' (sha256 {src['sha256'][:12]}...). Put that file back there or set "
            f"model.pretrained to its new location")
    digest = sha256_file(pretrained)
    if digest != src["sha256"]:
        raise SegpromptError(
            f"checkpoint '{where}' was trained on frozen weights with sha256 {src['sha256'][:12]}... but "
            f"'{pretrained}' has sha256 {digest[:12]}...; use the original file")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    random.setstate(state["python"])


def save_checkpoint(path: Path, **fields: Any) -> None:
    atomic_torch_save(fields, path)


def load_checkpoint(path: str | Path) -> Any:
    """What a checkpoint file holds (tensors and plain data only: ``weights_only``)."""
    path = Path(path)
    if path.is_dir():
        raise SegpromptError(f"checkpoint '{path}' is a directory; pass a .pt file (a run's are in "
                             f"{path / 'checkpoints'})")
    if not path.is_file():
        raise SegpromptError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one, in one line
        raise SegpromptError(f"checkpoint '{path}' cannot be read ({torch_load_reason(e)}): it is truncated, corrupt "
                             f"or not a PyTorch checkpoint; a segprompt checkpoint is {CONTENTS}") from None


def load_run_checkpoint(path: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """A checkpoint ``segprompt train`` wrote (for ``eval``; with ``resume``, one that holds the
    training state too); anything else is an error naming the file and what such a checkpoint holds."""
    state = load_checkpoint(path)
    weights = state.get("model") if isinstance(state, dict) else None
    if not (isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())):
        found = f"keys {sorted(map(str, state))[:6]}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise SegpromptError(f"'{path}' is not a segprompt checkpoint (it holds {found}); a segprompt checkpoint "
                             f"is {CONTENTS}")
    lacking = [k for k in RESUME_KEYS if k not in state] if resume else []
    if lacking:
        raise SegpromptError(f"checkpoint '{path}' cannot be resumed: it has no {', '.join(lacking)} (a deployed "
                             f"or exported model); start a new run from its weights with --load-from")
    return state


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], where: str, *,
                     allow_partial: bool = False, assign: bool = False) -> None:
    """Load ``state`` into ``model``; every trainable tensor must be present unless ``allow_partial``.
    With ``assign`` the model takes ``state``'s tensors instead of copying into its own (a model
    built on the meta device, or one whose frozen tensors are shared: docs/multitask.md)."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise SegpromptError(f"checkpoint '{where}' has keys this model does not: {unexpected[:8]}"
                             + (" ..." if len(unexpected) > 8 else ""))
    if not allow_partial:
        needed = changed_state_dict(model)
        missing = sorted(set(needed) - set(state))
        if missing:
            raise SegpromptError(f"checkpoint '{where}' lacks trained tensors of this model: {missing[:8]}"
                                 + (" ..." if len(missing) > 8 else ""))
    mismatched = [k for k, v in state.items() if own[k].shape != v.shape]
    if mismatched:
        raise SegpromptError(f"checkpoint '{where}' has tensors of other shapes: "
                             + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                         for k in mismatched[:5]))
    model.load_state_dict(state, strict=False, assign=assign)
