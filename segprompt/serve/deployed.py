"""The deployed inference model: what ``model(img)`` runs once a recipe or a run is put to use.

Two sources (``docs/deploy.md``, "Which model is exported"):

* **A recipe alone** (:func:`random_model`): its network built without pretrained files (random
  weights), tuning applied, learned text prompts deployed into a fixed K x 1024 buffer, eval mode.
  ``segprompt bench`` times this model; ``segprompt export RECIPE`` exports it.
* **A run directory, a checkpoint, a delta, or a recipe with a checkpoint** (:func:`load_deployed`):
  the same network with the checkpoint's weights, read by the one loader
  (:mod:`segprompt.runs.load`), then its text prompts deployed.

The class names of a trained model come from its checkpoint (older checkpoints: the dataset's
``meta.json``); a recipe alone takes them from ``meta.json`` when it exists, else
``data.num_classes`` placeholder names (:func:`recipe_meta`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from segprompt.build import apply_tuning, build_segmentor, is_recognition
from segprompt.config import Recipe, load_recipe
from segprompt.data.meta import META_FILE, DatasetMeta, check_num_classes, read_meta
from segprompt.errors import SegpromptError
from segprompt.io import sha256_file
from segprompt.models.text.guidance import TextGuidance, deploy_text
from segprompt.runs.load import (
    CHECKPOINT_NAMES,
    build_source_model,
    names_recipe,
    read_source,
)
from segprompt.tuning import TuningContext


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


@dataclass
class Deployed:
    """A deployed model and where it came from (recorded beside an exported file)."""

    cfg: Recipe
    model: nn.Module
    meta: DatasetMeta
    class_names: str  # where they came from: "checkpoint", "meta.json" or "placeholder"
    source: dict[str, Any] = field(default_factory=dict)


def load_deployed(target: str | Path, checkpoint: str | None = None, overrides: list[str] = (),
                  weights: str | Path | None = None) -> Deployed:
    """A run directory (``checkpoint``: default ``auto``), a checkpoint file or a delta, read by the one
    loader (:func:`~segprompt.runs.load.read_source`: no training data needed); or a recipe with
    ``checkpoint`` = a path; or a recipe alone (random weights, as ``segprompt bench`` builds it).
    The model is on the CPU, in eval mode, with its text prompts deployed."""
    target = Path(target)
    if names_recipe(target):
        cfg = load_recipe(target, list(overrides))
        if checkpoint in CHECKPOINT_NAMES[1:]:
            raise SegpromptError(f"--checkpoint {checkpoint} names a checkpoint of a run directory, but '{target}' "
                                 f"is a recipe; give the run directory, or --checkpoint PATH")
        if checkpoint in (None, "auto"):
            meta, names = recipe_meta(cfg)
            model = random_model(cfg, meta)
            return Deployed(cfg, model, meta, names, {"recipe": str(target), "weights": "random (no checkpoint)"})
        src = read_source(checkpoint, overrides=overrides, weights=weights, recipe=cfg)
    else:
        src = read_source(target, checkpoint, overrides=overrides, weights=weights, default="auto")
    model = build_source_model(src)
    deploy_text(model)  # learned prompts -> their embeddings (a deployed.pt holds them already)
    model.text_deployed = sum(isinstance(m, TextGuidance) and m.deployed for m in model.modules())
    names = "checkpoint" if isinstance(src.state.get("meta"), dict) else "meta.json"
    source = {"recipe": str(target), "weights": "checkpoint", "checkpoint": str(src.path),
              "checkpoint_sha256": sha256_file(src.path), "iteration": src.state.get("iteration")}
    return Deployed(src.cfg, model.eval(), src.meta, names, source)
