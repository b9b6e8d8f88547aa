"""Recipe -> objects: the model (with its tuning method applied) and the datasets.

The only place that turns recipe sections into constructor calls; the component names map to
the explicit tables in :mod:`segprompt.models` and :mod:`segprompt.tuning`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segprompt.config import SUPPLIED, Recipe
from segprompt.data.class_prior import cached_class_prior, training_prior_cache
from segprompt.data.dataset import SegDataset
from segprompt.data.meta import META_FILE, DatasetMeta, check_num_classes, read_meta
from segprompt.data.recognition import (
    RECOGNITION_DATASETS,
    RecognitionDataset,
    class_frequency,
    recognition_meta,
)
from segprompt.data.transforms import TestTransform, TrainTransform
from segprompt.errors import SegpromptError
from segprompt.models import BACKBONES, HEADS, LOSSES, EncoderDecoder, ImageClassifier
from segprompt.models.backbones.base import StagedBackbone
from segprompt.models.text.guidance import load_text_pretrained
from segprompt.models.weights import load_strict
from segprompt.tuning import METHODS, TuningContext


def _kwargs(component: dict, kind: str, **supplied: Any) -> dict:
    """A component's constructor arguments: the recipe's options and what the builder supplies
    (only the arguments ``SUPPLIED[kind]`` names, which recipes may not set)."""
    assert set(supplied) <= SUPPLIED[kind], f"{kind}: {set(supplied) - SUPPLIED[kind]} not in config.SUPPLIED"
    return {**{k: v for k, v in component.items() if k != "name"}, **supplied}


@contextlib.contextmanager
def recipe_key(key: str, name: str | None = None) -> Iterator[None]:
    """A constructor refusing a recipe's options (``ValueError``/``TypeError``, e.g. a ResNet depth
    the schema cannot know) becomes a user error that names the recipe key that fed it."""
    try:
        yield
    except (ValueError, TypeError) as e:
        what = f"{key} ('{name}')" if name else key
        raise SegpromptError(f"{what}: {' '.join(str(e).split())}; change it in the recipe or with --set") from None


def trained_backbone(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The backbone tensors of a segprompt checkpoint (``model.pretrained`` may name one: a run's
    trained backbone taken to a new task), or None when ``path`` is not a segprompt checkpoint."""
    if Path(path).suffix.lower() == ".safetensors" or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a PyTorch file: the backbone's own reader says why
        return None
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict) and "config" in state
            and "frozen_source" in state):
        return None
    tensors = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    if any(".lora_" in k or ".base_layer." in k for k in tensors):
        raise SegpromptError(f"model.pretrained '{path}' is a LoRA run's checkpoint: its backbone is LoRA factors on "
                             f"frozen weights, not a backbone; use the frozen weights file it was trained on")
    src = state.get("frozen_source") or {}
    if not state.get("full_model") and src.get("type") == "file":
        raise SegpromptError(f"model.pretrained '{path}' stores only what its run trained ({len(tensors)} backbone "
                             f"tensors); the rest of its backbone is the frozen file '{src.get('path')}' (sha256 "
                             f"{str(src.get('sha256'))[:12]}...). Take a run that tuned its whole backbone (full "
                             f"tuning), or use --load-from {path} --load-from-partial to start from all of it")
    return tensors


def load_backbone_weights(backbone: StagedBackbone, path: str, backbone_name: str) -> None:
    """Load a local backbone checkpoint strictly: missing or unexpected keys are an error that lists
    them. A segprompt checkpoint gives its trained backbone (:func:`trained_backbone`); any other
    file goes to the backbone's own :meth:`~StagedBackbone.load_pretrained`, which maps the file's
    key names to its own (and drops the classifier it never runs)."""
    try:
        trained = trained_backbone(path)
        if trained is not None:
            load_strict(backbone, trained, path, backbone_name, " (a segprompt checkpoint: its run's backbone must be "
                        "this recipe's model.backbone)")
        else:
            backbone.load_pretrained(path, backbone_name)
    except SegpromptError as e:  # the backbone describes the file; the recipe key is the builder's to add
        fix = "" if Path(path).is_file() else "; or point model.pretrained at the file"
        raise SegpromptError(f"model.pretrained: {e}{fix}") from None


def is_recognition(cfg: Recipe) -> bool:
    return cfg.data.dataset in RECOGNITION_DATASETS


def tuning_context(cfg: Recipe, meta: DatasetMeta) -> TuningContext:
    def prior(res: int):
        if is_recognition(cfg):  # the class frequencies, the same at every position
            freq = class_frequency(build_train_dataset(cfg, meta).labels, meta.num_classes)
            return np.broadcast_to(freq[:, None, None], (meta.num_classes, res, res))

        ds = SegDataset(cfg.data.root, cfg.data.train_split, meta, subset=cfg.data.train_subset,
                        subset_seed=cfg.data.subset_seed)
        root = Path(cfg.data.root)  # read-only to training: new priors go to the user cache
        return cached_class_prior(root, ds.labels, meta.num_classes, meta.ignore_index, res,
                                  cache_root=training_prior_cache(root))

    return TuningContext(num_classes=meta.num_classes, ignore_index=meta.ignore_index, class_prior=prior)


def build_segmentor(cfg: Recipe, meta: DatasetMeta, load_pretrained: bool = True) -> EncoderDecoder:
    """The recipe's network before tuning: built under ``runtime.seed`` (so frozen random
    weights are reproducible), with the pretrained backbone loaded."""
    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed)
        backbone_cls = BACKBONES[m.backbone["name"]]
        extra = {}
        if "class_names" in inspect.signature(backbone_cls).parameters:  # text-guided backbones
            extra["class_names"] = list(meta.classes)
        with recipe_key("model.backbone", m.backbone["name"]):
            backbone = backbone_cls(**_kwargs(m.backbone, "backbone", **extra))
        with recipe_key("loss", cfg.loss["name"]):
            loss = LOSSES[cfg.loss["name"]](**_kwargs(cfg.loss, "loss", ignore_index=meta.ignore_index))

        def head(spec: dict, key: str) -> nn.Module:
            in_index = spec.get("in_index", -1)
            channels = backbone.feature_channels
            if not -len(channels) <= in_index < len(channels):
                raise SegpromptError(f"{key}.in_index {in_index} is not a feature of backbone "
                                     f"'{m.backbone['name']}', which has {len(channels)} (0..{len(channels) - 1})")
            with recipe_key(key, spec["name"]):
                return HEADS[spec["name"]](**_kwargs(spec, "head", in_channels=channels[in_index],
                                                     num_classes=meta.num_classes, align_corners=m.align_corners,
                                                     loss=loss))

        decode_head = head(m.decode_head, "model.decode_head")
        if getattr(decode_head, "task", "segmentation") == "recognition":
            if m.aux_heads:
                raise SegpromptError("model.aux_heads: a classification head (linear_cls) takes no auxiliary heads")
            model = ImageClassifier(backbone, decode_head, [], m.align_corners)
        else:
            aux = [head(h, f"model.aux_heads.{i}") for i, h in enumerate(m.aux_heads)]
            model = EncoderDecoder(backbone, decode_head, aux, m.align_corners)
    if m.pretrained and load_pretrained:
        load_backbone_weights(model.backbone, m.pretrained, m.backbone["name"])
    if load_pretrained:  # CLIP text weights (or cached stage-1 embeddings) come from text.clip_weights
        load_text_pretrained(model)
    return model


def apply_tuning(model: EncoderDecoder, cfg: Recipe, ctx: TuningContext) -> None:
    """Let the recipe's tuning method decide what trains (it may insert modules)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed + 1)
        with recipe_key("tuning", cfg.tuning["name"]):
            METHODS[cfg.tuning["name"]](**_kwargs(cfg.tuning, "tuning")).apply(model, ctx)


def build_model(cfg: Recipe, meta: DatasetMeta) -> EncoderDecoder:
    model = build_segmentor(cfg, meta)
    apply_tuning(model, cfg, tuning_context(cfg, meta))
    return model


def _recognition_dataset(cfg: Recipe, meta: DatasetMeta, split: str, train: bool) -> RecognitionDataset:
    t = cfg.data.train
    if t.crop_size is None or cfg.data.test.scale is None:
        raise SegpromptError(f"data.train.crop_size and data.test.scale must be set for {cfg.data.dataset} "
                             f"(the training crop and the test size, e.g. [224, 224])")
    return RecognitionDataset(cfg.data.dataset, cfg.data.root, split, meta, train=train, crop_size=t.crop_size,
                              flip_prob=t.flip_prob, test_size=tuple(reversed(cfg.data.test.scale)),
                              subset=cfg.data.train_subset if train else None, subset_seed=cfg.data.subset_seed)


def build_train_dataset(cfg: Recipe, meta: DatasetMeta) -> SegDataset | RecognitionDataset:
    if is_recognition(cfg):
        return _recognition_dataset(cfg, meta, cfg.data.train_split, train=True)
    t = cfg.data.train
    try:
        tf = TrainTransform(scale=t.scale, ratio_range=t.ratio_range, scales=t.scales, keep_ratio=t.keep_ratio,
                            crop_size=t.crop_size, cat_max_ratio=t.cat_max_ratio, flip_prob=t.flip_prob,
                            photometric=t.photometric, ignore_index=meta.ignore_index,
                            pad_value=tuple(int(round(m)) for m in cfg.data.mean))
    except ValueError as e:
        raise SegpromptError(f"data.train: {e}") from None
    return SegDataset(cfg.data.root, cfg.data.train_split, meta, train_transform=tf,
                      skip_bad_images=cfg.data.skip_bad_images, subset=cfg.data.train_subset,
                      subset_seed=cfg.data.subset_seed)


def build_eval_dataset(cfg: Recipe, meta: DatasetMeta, split: str | None = None) -> SegDataset | RecognitionDataset:
    if is_recognition(cfg):
        return _recognition_dataset(cfg, meta, split or cfg.data.val_split, train=False)
    return SegDataset(cfg.data.root, split or cfg.data.val_split, meta, test_transform=build_test_transform(cfg),
                      skip_bad_images=cfg.data.skip_bad_images)


def build_test_transform(cfg: Recipe) -> TestTransform:
    """The recipe's test pipeline (``data.test``), the one ``eval`` and ``predict`` apply."""
    with recipe_key("data.test"):
        return TestTransform(scale=cfg.data.test.scale, keep_ratio=cfg.data.test.keep_ratio)


def dataset_meta(cfg: Recipe) -> DatasetMeta:
    if is_recognition(cfg):
        meta = recognition_meta(cfg.data.dataset, cfg.data.root, (cfg.data.train_split, cfg.data.val_split))
    else:
        meta = read_meta(cfg.data.root, cfg.data.dataset)
    check_num_classes(cfg.data.num_classes, meta, Path(cfg.data.root) / META_FILE)
    return meta
