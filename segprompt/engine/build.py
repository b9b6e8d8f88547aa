"""Recipe -> objects: the model (with its tuning method applied) and the datasets.

The only place that turns recipe sections into constructor calls; the component names map to
the explicit tables in :mod:`segprompt.models` and :mod:`segprompt.tuning`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from segprompt.config import Recipe
from segprompt.data.dataset import SegDataset
from segprompt.data.meta import DatasetMeta, read_meta
from segprompt.data.transforms import TestTransform, TrainTransform
from segprompt.errors import SegpromptError
from segprompt.models import BACKBONES, HEADS, LOSSES, EncoderDecoder
from segprompt.tuning import METHODS, TuningContext


def _kwargs(component: dict) -> dict:
    return {k: v for k, v in component.items() if k != "name"}


def load_backbone_weights(backbone: nn.Module, path: str, backbone_name: str) -> None:
    """Load a local backbone checkpoint strictly: missing or unexpected keys are an error."""
    p = Path(path)
    if not p.is_file():
        raise SegpromptError(
            f"pretrained weights '{p}' (model.pretrained) do not exist. Put the {backbone_name} "
            f"checkpoint file there, or point model.pretrained at it (nothing is downloaded)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SegpromptError(f"pretrained weights '{p}' cannot be read ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if state and all(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items()}
    own = backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise SegpromptError(
            f"pretrained weights '{p}' do not fit backbone '{backbone_name}': "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise SegpromptError(f"pretrained weights '{p}' have other shapes for {bad[:5]}")
    backbone.load_state_dict(state)


def tuning_context(cfg: Recipe, meta: DatasetMeta) -> TuningContext:
    def prior(res: int):
        from segprompt.data.class_prior import cached_class_prior

        ds = SegDataset(cfg.data.root, cfg.data.train_split, meta, subset=cfg.data.train_subset,
                        subset_seed=cfg.data.subset_seed)
        return cached_class_prior(Path(cfg.data.root), ds.labels, meta.num_classes, meta.ignore_index, res)

    return TuningContext(num_classes=meta.num_classes, ignore_index=meta.ignore_index, class_prior=prior)


def build_model(cfg: Recipe, meta: DatasetMeta, ctx: TuningContext | None = None) -> EncoderDecoder:
    """Build under ``runtime.seed`` (so frozen random weights are reproducible), load the
    pretrained backbone, then let the tuning method decide what trains."""
    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed)
        backbone = BACKBONES[m.backbone["name"]](**_kwargs(m.backbone))
        loss = LOSSES[cfg.loss["name"]](ignore_index=meta.ignore_index, **_kwargs(cfg.loss))

        def head(spec: dict) -> nn.Module:
            in_index = spec.get("in_index", -1)
            in_channels = backbone.out_channels[backbone.out_indices[in_index]]
            return HEADS[spec["name"]](in_channels=in_channels, num_classes=meta.num_classes,
                                       align_corners=m.align_corners, loss=loss, **_kwargs(spec))

        model = EncoderDecoder(backbone, head(m.decode_head), [head(h) for h in m.aux_heads], m.align_corners)
    if m.pretrained:
        load_backbone_weights(model.backbone, m.pretrained, m.backbone["name"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed + 1)
        METHODS[cfg.tuning["name"]](**_kwargs(cfg.tuning)).apply(model, ctx or tuning_context(cfg, meta))
    return model


def build_train_dataset(cfg: Recipe, meta: DatasetMeta) -> SegDataset:
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


def build_eval_dataset(cfg: Recipe, meta: DatasetMeta, split: str | None = None) -> SegDataset:
    tf = TestTransform(scale=cfg.data.test.scale, keep_ratio=cfg.data.test.keep_ratio)
    return SegDataset(cfg.data.root, split or cfg.data.val_split, meta, test_transform=tf,
                      skip_bad_images=cfg.data.skip_bad_images)


def dataset_meta(cfg: Recipe) -> DatasetMeta:
    return read_meta(cfg.data.root, cfg.data.dataset)
