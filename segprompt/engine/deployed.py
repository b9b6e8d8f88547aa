"""The deployed inference model: what ``model(img)`` runs once a recipe or a run is put to use.

Two sources (``docs/deploy.md``, "Which model is exported"):

* **A recipe alone** (:func:`random_model`): its network built without pretrained files (random
  weights), tuning applied, learned text prompts deployed into a fixed K x 1024 buffer, eval mode.
  ``segprompt bench`` times this model; ``segprompt export RECIPE`` exports it.
* **A run directory, or a recipe with a checkpoint** (:func:`load_deployed`): the same network with
  the checkpoint's weights, read the way ``segprompt eval`` reads them
  (:func:`~segprompt.engine.evaluate.build_checkpoint_model`), then its text prompts deployed.

The class names come from the dataset's ``meta.json`` when it exists, else ``data.num_classes``
placeholder names (:func:`recipe_meta`), so a whole-model checkpoint (``deployed.pt``,
``save_full_model``) deploys on a machine without the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from segprompt.config import Recipe, load_recipe
from segprompt.data.meta import META_FILE, DatasetMeta, check_num_classes, read_meta
from segprompt.engine import checkpoint as ckpt
from segprompt.engine.build import apply_tuning, build_segmentor, is_recognition
from segprompt.engine.evaluate import build_checkpoint_model
from segprompt.engine.rundir import BEST, CKPT_DIR, CONFIG, DEPLOYED, LAST
from segprompt.errors import SegpromptError
from segprompt.io import sha256_file
from segprompt.models.text.guidance import TextGuidance, deploy_text
from segprompt.tuning import TuningContext

CHECKPOINTS = ("auto", "best", "last", "deployed")  # or a path


def recipe_meta(cfg: Recipe) -> tuple[DatasetMeta, str]:
    """The classes: the prepared dataset's ``meta.json`` when it exists, else ``data.num_classes``
    placeholder names ``class0, class1, ...`` (they tokenise for learned prompts up to 100 classes).
    Returns the meta and where the names came from ("meta.json" or "placeholder")."""
    path = Path(cfg.data.root) / META_FILE
    if not is_recognition(cfg) and path.is_file():
        meta = read_meta(cfg.data.root, cfg.data.dataset)
        check_num_classes(cfg.data.num_classes, meta, path)
        return meta, "meta.json"
    k = cfg.data.num_classes
    if k is None:
        raise SegpromptError(f"the number of classes is unknown: the recipe sets no data.num_classes and "
                             f"'{path}' does not exist; add --set data.num_classes=K (or prepare the dataset)")
    return DatasetMeta(name=cfg.data.dataset, classes=[f"class{i}" for i in range(k)], palette=[[0, 0, 0]] * k), \
        "placeholder"


def random_model(cfg: Recipe, meta: DatasetMeta | None = None) -> nn.Module:
    """The recipe's model as deployed for inference, on the CPU: no pretrained files read (random
    weights), tuning applied, learned text prompts deployed, eval mode. The number of deployed
    text modules is in ``model.text_deployed``."""
    meta = meta or recipe_meta(cfg)[0]
    model = build_segmentor(cfg, meta, load_pretrained=False)
    apply_tuning(model, cfg, TuningContext(num_classes=meta.num_classes, ignore_index=meta.ignore_index))
    model.text_deployed = deploy_text(model)
    return model.eval()


def run_checkpoint(run_dir: Path, name: str) -> Path:
    """``auto`` (``deployed.pt`` when the run wrote one, else ``best.pt``), ``best``, ``last``,
    ``deployed``, or a path, for the run directory ``run_dir``."""
    folder = run_dir / CKPT_DIR
    if name == "auto":
        return folder / DEPLOYED if (folder / DEPLOYED).is_file() else folder / BEST
    return {"best": folder / BEST, "last": folder / LAST, "deployed": folder / DEPLOYED}.get(name, Path(name))


@dataclass
class Deployed:
    """A deployed model and where it came from (recorded beside an exported file)."""

    cfg: Recipe
    model: nn.Module
    meta: DatasetMeta
    class_names: str  # "meta.json" or "placeholder"
    source: dict[str, Any] = field(default_factory=dict)


def load_deployed(target: str | Path, checkpoint: str | None = None, overrides: list[str] = ()) -> Deployed:
    """A run directory (its ``config.yaml`` and ``checkpoint``, default ``auto``), a recipe with
    ``checkpoint`` = a path, or a recipe alone (random weights, as ``segprompt bench`` builds it).
    The model is on the CPU, in eval mode, with its text prompts deployed."""
    target = Path(target)
    if target.is_dir():
        if not (target / CONFIG).is_file():
            raise SegpromptError(f"'{target}' is a folder but not a run directory ('{target / CONFIG}' is missing); "
                                 f"give a run directory, or a recipe (with --checkpoint PATH for trained weights)")
        cfg = load_recipe(target / CONFIG, list(overrides))
        path = run_checkpoint(target, checkpoint or "auto")
    else:
        cfg = load_recipe(target, list(overrides))
        if checkpoint in CHECKPOINTS[1:]:
            raise SegpromptError(f"--checkpoint {checkpoint} names a checkpoint of a run directory, but '{target}' "
                                 f"is a recipe; give the run directory, or --checkpoint PATH")
        path = None if checkpoint in (None, "auto") else Path(checkpoint)
    meta, names = recipe_meta(cfg)
    if path is None:
        model = random_model(cfg, meta)
        return Deployed(cfg, model, meta, names, {"recipe": str(target), "weights": "random (no checkpoint)"})
    state = ckpt.load_run_checkpoint(path)
    ckpt.check_frozen_source(state, cfg.model.pretrained, str(path))
    model = build_checkpoint_model(cfg, meta, state, str(path))
    deploy_text(model)  # learned prompts -> their embeddings (a deployed.pt holds them already)
    model.text_deployed = sum(isinstance(m, TextGuidance) and m.deployed for m in model.modules())
    source = {"recipe": str(target), "weights": "checkpoint", "checkpoint": str(path),
              "checkpoint_sha256": sha256_file(path), "iteration": state.get("iteration")}
    return Deployed(cfg, model.eval(), meta, names, source)
