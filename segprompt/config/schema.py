"""The recipe schema: one dataclass per section of a recipe, typed and ranged, and the component
tables (``model.backbone``, heads, ``loss``, ``tuning``) whose constructors define their options
(``docs/recipes.md``)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (123.675, 116.28, 103.53)


IMAGENET_STD = (58.395, 57.12, 57.375)


class Component(dict):
    """Marker type: a mapping ``{name: <constructor>, **kwargs}`` checked against a table."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``typing.Annotated[int, Range(1)]`` is an int >= 1."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo < value instead of lo <= value
    hi_open: bool = False
    note: str = ""  # what a boundary value means, shown in messages

    def __contains__(self, v: float) -> bool:
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo}"
        else:
            text = f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"{text} ({self.note})" if self.note else text


AtLeast1 = typing.Annotated[int, Range(1)]


AtLeast0 = typing.Annotated[int, Range(0)]


NonNegative = typing.Annotated[float, Range(0)]


Positive = typing.Annotated[float, Range(0, lo_open=True)]


Fraction = typing.Annotated[float, Range(0, 1)]


Beta = typing.Annotated[float, Range(0, 1, hi_open=True)]


# Constructor arguments the builder (segprompt/build.py) passes itself, per component kind:
# a recipe may not set them, and build passes nothing else
SUPPLIED = {
    "backbone": frozenset({"in_channels", "class_names"}),
    "head": frozenset({"in_channels", "num_classes", "ignore_index", "align_corners", "loss"}),
    "loss": frozenset({"ignore_index"}),
    "tuning": frozenset(),
}


def component_tables() -> dict[str, tuple[dict[str, Any], frozenset[str]]]:
    """Component tables: kind -> (name -> constructor, arguments the builder supplies itself)."""
    # here, not at the top: every user of config (data included) would otherwise load every model
    from segprompt.models import BACKBONES, HEADS, LOSSES
    from segprompt.tuning import METHODS

    tables = {"backbone": BACKBONES, "head": HEADS, "loss": LOSSES, "tuning": METHODS}
    return {kind: (table, SUPPLIED[kind]) for kind, table in tables.items()}


@dataclass
class ModelConfig:
    # component defaults hold only the name: a recipe's options then merge over the
    # constructor's own defaults, never over another recipe's
    backbone: typing.Annotated[Component, "backbone"] = field(default_factory=lambda: Component(name="resnet"))
    decode_head: typing.Annotated[Component, "head"] = field(default_factory=lambda: Component(name="fcn"))
    aux_heads: list[typing.Annotated[Component, "head"]] = field(default_factory=list)
    pretrained: str | None = None  # local backbone checkpoint file
    align_corners: bool = False


@dataclass
class TrainPipelineConfig:
    scale: tuple[AtLeast1, AtLeast1] | None = None  # (long, short) as MMSegmentation's (w, h) scale
    ratio_range: tuple[Positive, Positive] | None = None
    scales: list[tuple[AtLeast1, AtLeast1]] | None = None  # discrete scale list, one drawn per sample
    keep_ratio: bool = True
    crop_size: tuple[AtLeast1, AtLeast1] | None = None  # (h, w)
    cat_max_ratio: typing.Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    flip_prob: Fraction = 0.5
    photometric: bool = True


@dataclass
class TestPipelineConfig:
    scale: tuple[AtLeast1, AtLeast1] | None = None
    keep_ratio: bool = True


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # which `segprompt prepare DATASET` makes `root`
    num_classes: AtLeast1 | None = None  # if set, checked against meta.json (and used by count-params)
    root: str = "data/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    batch_size: AtLeast1 = 8  # global batch: world size x per-process batch x accumulation steps
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB, 0..255 units
    std: tuple[Positive, Positive, Positive] = IMAGENET_STD
    train: TrainPipelineConfig = field(default_factory=TrainPipelineConfig)
    test: TestPipelineConfig = field(default_factory=TestPipelineConfig)
    skip_bad_images: bool = False  # skip unreadable images (counted, summarised) instead of failing
    # train on N images drawn from the training split by subset_seed (the SPM paper's one-shot
    # retinal protocol: N = 1, one run per seed); null = the whole split
    train_subset: AtLeast1 | None = None
    subset_seed: int = 0


@dataclass
class ParamGroupConfig:
    pattern: str  # regular expression searched in parameter names; the first match wins
    lr_mult: NonNegative = 1.0
    decay_mult: NonNegative = 1.0


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: NonNegative = 0.01
    weight_decay: NonNegative = 5e-4
    momentum: NonNegative = 0.9
    nesterov: bool = False
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: NonNegative = 1e-8
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    grad_clip: Positive | None = None  # max global L2 norm of the gradients
    accum_steps: AtLeast1 = 1


@dataclass
class ScheduleConfig:
    iters: AtLeast1 = 40
    warmup_iters: AtLeast0 = 0
    warmup_ratio: Fraction = 1e-6  # lr at iteration 0 = ratio x poly lr (MMSegmentation's linear warm-up)
    power: NonNegative = 0.9
    min_lr: NonNegative = 1e-4


@dataclass
class EvaluationConfig:
    interval: typing.Annotated[int, Range(0, note="0 = only at the end")] = 0  # evaluate every N iterations
    metric: str = "mIoU"  # selects the best checkpoint
    mode: Literal["whole", "slide"] = "whole"
    crop_size: tuple[AtLeast1, AtLeast1] | None = None  # slide window (h, w)
    stride: tuple[AtLeast1, AtLeast1] | None = None  # at most crop_size (checked in _check_relations)
    slide_batch: AtLeast1 = 4  # windows per forward pass
    tta: bool = False
    tta_scales: list[Positive] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    tta_flip: bool = True


@dataclass
class CheckpointConfig:
    interval: AtLeast1 = 1000  # write checkpoints/last.pt every N iterations (and at the end)
    keep: AtLeast0 = 0  # also keep the newest N checkpoints/iter_<N>.pt
    save_full_model: bool = False  # default: only what training changed + frozen-weights reference


@dataclass
class RuntimeConfig:
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["off", "fp16", "bf16"] = "off"
    num_workers: AtLeast0 = 2
    log_interval: AtLeast1 = 10
    find_unused_parameters: bool = False
    cudnn_benchmark: bool = False
    tensorboard: bool = False  # TensorBoard scalars and overlays in RUN/tb/ (docs/watch.md; segprompt[watch])
    # experiment trackers, rank 0 only (docs/watch.md): tensorboard (segprompt[watch]), wandb and mlflow
    # (segprompt[track]); a resume continues the same tracked runs (RUN/trackers.json)
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    project: str = "segprompt"  # the W&B project and the MLflow experiment


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    tuning: typing.Annotated[Component, "tuning"] = field(default_factory=lambda: Component(name="full"))
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: typing.Annotated[Component, "loss"] = field(
        default_factory=lambda: Component(name="cross_entropy")
    )
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
