"""One loader for trained models (docs/api.md; docs/runs.md, "Runs that travel").

A trained model is named by a path: a run directory (its ``config.yaml`` and a checkpoint picked by
name), a checkpoint file anywhere (its run directory, or the recipe it stores, gives the recipe), or a
delta (``segprompt export --format delta``, which stores its recipe). :func:`read_source` reads
what the path names without building anything; :func:`build_source_model` builds the model
(:func:`segprompt.serve.segmenter.load` does both and returns a ``Segmenter``). ``eval``, ``predict``, ``predict --tasks``,
``export``, ``bench`` and :class:`~segprompt.serve.multitask.MultiTaskModel` all read through here.

What makes a run travel:

- **Classes, palette and ignore index** are stored in every checkpoint (``meta``), so predict,
  export and bench never read the training data. Checkpoints written before that read the
  dataset's ``meta.json``.
- **Relative paths** in a run's recipe (``data.root``, ``model.pretrained``, the CLIP file) are
  resolved against the folder training ran in (``cwd`` in the checkpoint) when they do not exist
  from the current folder.
- **Frozen weights** (a trainable-only checkpoint holds only what training changed) are found at
  ``model.pretrained``, at the path recorded when training ran, or at ``weights`` (``--weights``),
  and used only if their SHA-256 is the recorded one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from segprompt.build import apply_tuning, build_segmentor, dataset_meta
from segprompt.config import Recipe, load_recipe
from segprompt.data.meta import DatasetMeta
from segprompt.errors import SegpromptError
from segprompt.io import sha256_file
from segprompt.models.text.guidance import deploy_text
from segprompt.runs import checkpoint as ckpt
from segprompt.runs import delta as delta_file
from segprompt.runs.rundir import BEST, CKPT_DIR, CONFIG, DEPLOYED, LAST
from segprompt.tuning import TuningContext

CHECKPOINT_NAMES = ("auto", "best", "last", "deployed")  # or a path
WEIGHTS_FLAG = "--weights PATH (Python: weights=PATH)"


def checkpoint_path(run_dir: Path, name: str) -> Path:
    """The one name -> file resolver: ``best``, ``last``, ``deployed`` of the run directory ``run_dir``;
    ``auto`` is ``deployed.pt`` when the run wrote one (text-guided runs), else ``best.pt``; any
    other name is a path."""
    folder = Path(run_dir) / CKPT_DIR
    if name == "auto":
        return folder / DEPLOYED if (folder / DEPLOYED).is_file() else folder / BEST
    return {"best": folder / BEST, "last": folder / LAST, "deployed": folder / DEPLOYED}.get(name, Path(name))


def names_recipe(target: Path) -> bool:
    """Whether a command's ``target`` is a recipe (a ``.yaml`` file, or a shipped recipe's name, which
    is no path) rather than a run directory, a checkpoint or a delta."""
    return not target.exists() or target.is_file() and target.suffix.lower() in (".yaml", ".yml")


def _stored_meta(state: dict[str, Any]) -> DatasetMeta | None:
    """The classes, palette and ignore index a checkpoint or delta stores (older checkpoints: None)."""
    stored = state.get("meta")
    return DatasetMeta(**stored) if isinstance(stored, dict) else None


def init_checkpoint(path: str | Path) -> Path:
    """``--load-from PATH``: a run directory stands for its best checkpoint (its last when it has
    no best); anything else is the file itself."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG).is_file():
        best = checkpoint_path(path, "best")
        return best if best.is_file() else checkpoint_path(path, "last")
    return path


@dataclass
class Source:
    """What a path names, read but not built."""

    cfg: Recipe  # relative paths resolved, model.pretrained pointing at the verified frozen weights
    state: dict[str, Any]  # the checkpoint's contents (``model``, ``frozen_source``, ``iteration``, ...)
    path: Path  # the checkpoint or delta file
    run_dir: Path | None  # the run directory it belongs to, if any
    meta: DatasetMeta  # classes, palette, ignore index


def read_source(target: str | Path, checkpoint: str | None = None, *, overrides: Sequence[str] = (),
                weights: str | Path | None = None, default: str = "best", need_data: bool = False,
                recipe: Recipe | None = None) -> Source:
    """Read a run directory (``checkpoint`` a name of :data:`CHECKPOINT_NAMES` or a path; ``default``
    when None), a checkpoint file or a delta. ``overrides`` are ``--set`` values for its recipe;
    ``weights`` is the frozen weights file when it is not where the run recorded it.
    ``need_data``: the dataset will be read (eval), so its meta.json is read too and must agree.
    ``recipe``: the recipe to build (``eval RECIPE --checkpoint PATH``) instead of the checkpoint's."""
    target = Path(target)
    run_dir = None
    if target.is_dir():
        if not (target / CONFIG).is_file():
            raise SegpromptError(f"'{target}' is a folder but not a run directory ('{target / CONFIG}' is missing); "
                                 f"pass the folder `segprompt train` wrote, one of its checkpoints, or a delta")
        run_dir, path = target, checkpoint_path(target, checkpoint or default)
    else:
        if not target.exists():
            raise SegpromptError(f"'{target}' does not exist; pass a run directory, a checkpoint file or a delta")
        if target.suffix.lower() in (".yaml", ".yml"):
            raise SegpromptError(f"'{target}' is a recipe, which holds no trained weights: pass the run directory "
                                 f"`segprompt train` wrote (or one of its checkpoints, or a delta)")
        if checkpoint is not None and checkpoint != default:
            raise SegpromptError(f"--checkpoint picks a checkpoint of a run directory, but '{target}' is a file "
                                 f"already; drop --checkpoint, or pass the run directory")
        path = target
        if target.parent.name == CKPT_DIR and (target.parent.parent / CONFIG).is_file():
            run_dir = target.parent.parent
    state = delta_file.read_delta(path) if delta_file.is_delta(path) else ckpt.load_run_checkpoint(path)
    cfg = recipe if recipe is not None else _recipe(state, run_dir, path, overrides)
    _localise(cfg, state.get("cwd"))
    if not state.get("full_model"):
        cfg.model.pretrained = frozen_weights(cfg, state, weights, str(path))
    stored = _stored_meta(state)
    if stored is not None and not need_data:
        meta = stored
    else:
        meta = dataset_meta(cfg)
        if stored is not None and list(stored.classes) != list(meta.classes):
            raise SegpromptError(f"checkpoint '{path}' was trained on classes {stored.classes[:6]}..., but "
                                 f"'{cfg.data.root}' has {meta.classes[:6]}...; point data.root at its dataset")
    return Source(cfg, state, path, run_dir, meta)


def run_recipe(target: str | Path, overrides: Sequence[str] = ()) -> tuple[Recipe, DatasetMeta | None]:
    """What a command given "a run directory or a recipe" reads when it needs no trained weights
    (``bench``): a run directory's recipe, with its relative paths resolved and its classes from its
    newest checkpoint (None if it has none); or the recipe ``target`` and None."""
    target = Path(target)
    if not target.is_dir():
        return load_recipe(target, list(overrides)), None
    if not (target / CONFIG).is_file():
        raise SegpromptError(f"'{target}' is a folder but not a run directory ('{target / CONFIG}' is missing); give a "
                             f"recipe file or a run directory")
    cfg = load_recipe(target / CONFIG, list(overrides))
    found = [p for p in (checkpoint_path(target, n) for n in ("best", "last")) if p.is_file()]
    if not found:
        return cfg, None
    state = ckpt.load_run_checkpoint(max(found, key=lambda p: p.stat().st_mtime))
    _localise(cfg, state.get("cwd"))
    return cfg, _stored_meta(state)


def _recipe(state: dict[str, Any], run_dir: Path | None, path: Path, overrides: Sequence[str]) -> Recipe:
    if run_dir is not None:
        return load_recipe(run_dir / CONFIG, list(overrides))
    if not isinstance(state.get("config"), dict):
        raise SegpromptError(f"checkpoint '{path}' holds no recipe and is not in a run directory; pass the run directory "
                             f"it came from, with --checkpoint {path}")
    return load_recipe(f"the recipe stored in '{path}'", list(overrides), tree=state["config"])


def _localise(cfg: Recipe, cwd: str | None) -> None:
    """Relative paths of the run's recipe that do not exist here but do under ``cwd`` (the folder
    training ran in) become absolute paths there."""
    if not cwd:
        return

    def fix(value: str | None) -> str | None:
        if not value or Path(value).is_absolute() or Path(value).exists() or not (Path(cwd) / value).exists():
            return value
        return str(Path(cwd) / value)
    cfg.data.root = fix(cfg.data.root)
    cfg.model.pretrained = fix(cfg.model.pretrained)
    text = cfg.model.backbone.get("text")
    if isinstance(text, dict):
        for key in ("clip_weights", "embeddings_cache"):
            if isinstance(text.get(key), str):
                text[key] = fix(text[key])


def frozen_weights(cfg: Recipe, state: dict[str, Any], weights: str | Path | None, where: str) -> str | None:
    """The file the checkpoint's frozen weights come from, checked by its SHA-256: ``weights`` if
    given, else ``model.pretrained``, else the path recorded when training ran. None when the
    frozen weights come from a seed (no file)."""
    src = state.get("frozen_source") or {}
    if src.get("type") != "file":
        return cfg.model.pretrained
    want = src["sha256"]
    if weights is not None:
        if not Path(weights).is_file():
            raise SegpromptError(f"--weights '{weights}' does not exist")
        got = sha256_file(weights)
        if got != want:
            raise SegpromptError(f"--weights '{weights}' has sha256 {got}, but the frozen weights of '{where}' have "
                                 f"sha256 {want}: pass the file this run was trained on")
        return str(weights)
    seen = []
    for candidate in dict.fromkeys(p for p in (cfg.model.pretrained, src.get("path")) if p):
        if Path(candidate).is_file():
            if sha256_file(candidate) == want:
                return str(candidate)
            seen.append(candidate)
    if seen:
        raise SegpromptError(f"'{where}' was trained on frozen weights with sha256 {want}, but "
                             f"{' and '.join(repr(p) for p in seen)} hold(s) other weights; restore the original "
                             f"file, or pass it with {WEIGHTS_FLAG}")
    raise SegpromptError(f"'{where}' stores only what training changed; its frozen weights (sha256 {want}) were "
                         f"at '{src.get('path')}', which is gone. Put that file back there, or pass it with "
                         f"{WEIGHTS_FLAG}")


def build_source_model(src: Source) -> nn.Module:
    """The model with the checkpoint's (or delta's) weights, on the CPU, in eval mode. The class
    prior SPM starts from is not read: the trained one is in the checkpoint."""
    cfg, state, where = src.cfg, src.state, str(src.path)
    ctx = TuningContext(num_classes=src.meta.num_classes, ignore_index=src.meta.ignore_index)
    if not state.get("full_model"):
        model = build_segmentor(cfg, src.meta)
        apply_tuning(model, cfg, ctx)
        ckpt.restore_frozen(model, state, where)
        ckpt.load_model_state(model, state["model"], where)
        return model.eval()
    model = build_segmentor(cfg, src.meta, load_pretrained=False)
    apply_tuning(model, cfg, ctx)
    if state.get("deployed"):
        deploy_text(model)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise SegpromptError(f"checkpoint '{where}' does not fit this recipe's model: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}")
    return model.eval()


__all__ = ["CHECKPOINT_NAMES", "Source", "build_source_model", "checkpoint_path", "init_checkpoint", "read_source",
           "run_recipe"]
