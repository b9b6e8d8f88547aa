"""What a trained run gives away besides a graph (``segprompt export --format delta|checkpoint``;
docs/api.md, "Deltas").

- **A delta** (:func:`export_delta`): what training changed on top of the frozen backbone, as a
  ``.safetensors`` file with the recipe, classes and the backbone's SHA-256
  (:mod:`segprompt.runs.delta`). Small; loads only onto that backbone.
- **A whole checkpoint** (:func:`export_checkpoint`): every tensor of the trained model in one
  plain ``.pt`` file that needs no frozen weights file, with LoRA factors merged into their layers
  (peft's own merge), so it is the plain network: loadable by ``segprompt.load``, usable as another
  recipe's ``model.pretrained``, or by any code that builds the same architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segprompt import __version__
from segprompt.build import build_segmentor
from segprompt.errors import SegpromptError
from segprompt.io import atomic_torch_save, refuse_inputs_as_outputs, sha256_file
from segprompt.runs import delta as delta_file
from segprompt.runs.load import Source, build_source_model, read_source
from segprompt.runs.runlock import refuse_live_run
from segprompt.serve.export import merge_lora


def _check_out(out: Path, suffixes: tuple[str, ...], what: str, force: bool) -> None:
    refuse_live_run(out, "--out")
    if out.suffix.lower() not in suffixes:
        raise SegpromptError(f"--out '{out}': {what} is a {' or '.join(suffixes)} file, e.g. "
                             f"{out.with_suffix(suffixes[0])}")
    if out.is_dir() or out.exists() and not force:
        raise SegpromptError(f"'{out}' already exists; choose another --out, or add --force to replace it")


def _inputs(src: Source, weights: str | Path | None) -> list[Path]:
    """The files an export reads: the checkpoint, and the frozen weights (``model.pretrained`` or
    ``--weights``)."""
    files = [src.path] + [Path(p) for p in (src.cfg.model.pretrained, weights) if p]
    return [p for p in files if p.is_file()]


def _full_bytes(src: Source) -> int:
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        full = build_segmentor(src.cfg, src.meta, load_pretrained=False)
    return sum(t.numel() * t.element_size() for t in full.state_dict().values())


def export_delta(target: str | Path, out: str | Path, *, checkpoint: str | None = None,
                 weights: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Write what a run's checkpoint changed on top of its frozen backbone to ``out``
    (``.safetensors``): the checkpoint's tensors, and its recipe, classes, palette and the frozen
    weights' SHA-256 as metadata (:mod:`segprompt.runs.delta`). Returns the sizes."""
    out = Path(out)
    _check_out(out, (delta_file.SUFFIX,), "a delta", force)
    src = read_source(target, checkpoint, weights=weights)
    refuse_inputs_as_outputs([out], _inputs(src, weights))
    state = src.state
    if state.get("full_model") or state.get("delta"):
        what = "is a delta already" if state.get("delta") else "stores the whole model (a deployed model or " \
                                                                  "checkpoint.save_full_model)"
        raise SegpromptError(f"'{src.path}' {what}; a delta is made from a trainable-only checkpoint: the run's "
                             f"best.pt or last.pt (--checkpoint best|last)")
    init = (state.get("frozen_source") or {}).get("init")
    if init:
        raise SegpromptError(f"'{src.path}' was trained on frozen weights partly taken from the --load-from "
                             f"checkpoint '{init['path']}', which a delta cannot carry; share the run directory "
                             f"(with that checkpoint) instead")
    full_bytes = _full_bytes(src)
    tensors = state["model"]
    delta_file.write_delta(out, tensors, config=state.get("config") or src.cfg.to_dict(),
                           meta=state.get("meta") or src.meta.portable(), frozen_source=state.get("frozen_source"),
                           iteration=state.get("iteration"), cwd=state.get("cwd"), segprompt=__version__,
                           source=str(src.path), source_sha256=sha256_file(src.path))
    return {"delta": str(out), "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
            "file_bytes": out.stat().st_size, "full_model_bytes": full_bytes, "checkpoint": str(src.path),
            "frozen_sha256": (state.get("frozen_source") or {}).get("sha256")}


def delta_lines(record: dict[str, Any]) -> list[str]:
    """What ``segprompt export --format delta`` prints: what the delta holds and its size against
    the whole model's."""
    share = 100 * record["file_bytes"] / max(record["full_model_bytes"], 1)
    frozen = (f"the frozen backbone with sha256 {record['frozen_sha256'][:12]}... (pass its file with --weights)"
              if record["frozen_sha256"] else "the frozen backbone rebuilt from the recipe's seed (no file)")
    return [f"delta: {record['tensors']} tensors, {record['parameters']:,} parameters, "
            f"{record['file_bytes'] / 1e6:.2f} MB; the whole model is {record['full_model_bytes'] / 1e6:.2f} MB "
            f"(the delta is {share:.2f} % of it)",
            f"it loads onto {frozen}: segprompt predict {record['delta']} IMAGES --out DIR"]


def export_checkpoint(target: str | Path, out: str | Path, *, checkpoint: str | None = None,
                      weights: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Write the whole trained model to ``out`` (``.pt``) with LoRA merged into its layers. Its
    recipe is the run's, with ``tuning: {name: full}`` once LoRA is merged (the factors are in the
    weights now: the file is the plain network). Returns what was written."""
    out = Path(out)
    _check_out(out, (".pt", ".pth"), "a whole checkpoint", force)
    src = read_source(target, checkpoint, weights=weights)
    refuse_inputs_as_outputs([out], _inputs(src, weights))
    model = build_source_model(src)
    merged = merge_lora(model)
    config = dict(src.state.get("config") or src.cfg.to_dict())
    if merged:
        config["tuning"] = {"name": "full"}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_torch_save({"model": state, "full_model": True, "config": config, "meta": src.meta.portable(),
                       "frozen_source": {"type": "none", "note": "every tensor is in this file"},
                       "iteration": src.state.get("iteration"), "lora_merged": merged, "source": str(src.path),
                       "source_sha256": sha256_file(src.path), "segprompt": __version__}, out)
    return {"checkpoint": str(out), "tensors": len(state), "lora_merged": merged, "file_bytes": out.stat().st_size,
            "source": str(src.path)}
