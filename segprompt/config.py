"""YAML recipes: `base:` inheritance, `--set` overrides and strict, typed validation.

A recipe is a YAML mapping with the sections of :class:`Recipe`. ``base:`` names one file or a
list of files (relative to the recipe, else shipped recipes) whose contents are merged first,
later ones winning; the recipe itself wins over its bases. Mappings merge key by key and lists
are replaced whole. A mapping that names a component (a ``name:`` key) is replaced whole when the
name changes, so a recipe can swap ``model.backbone`` without inheriting the old backbone's options.

Recipes name files the way :func:`resolve_recipe` says (docs/recipes.md): an existing file is
that file; otherwise a name such as ``smoke`` or ``spm/ade20k_r101_spm`` is the recipe shipped with
segprompt (the repository's ``recipes/`` folder, installed as ``segprompt.recipes``).

Validation is strict: an unknown key is an error naming the file that set it, the key path and
the closest valid key; a wrong type names the key and the expected type. Components
(``model.backbone``, heads, ``loss``, ``tuning``) are checked against their constructor's
signature, so every option a recipe can set is an argument of an explicit constructor.

Written by hand rather than with pydantic or OmegaConf because the messages must name the file
in the inheritance chain that set a key and suggest the closest valid key, and component options
are validated from constructor signatures; neither library does either.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import difflib
import importlib.resources
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from segprompt.errors import SegpromptError

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# ----------------------------------------------------------------------------------------------
# Schema


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


def _tables() -> dict[str, tuple[dict[str, Any], set[str]]]:
    """Component tables: kind -> (name -> constructor, arguments the builder supplies itself)."""
    from segprompt.models import BACKBONES, HEADS, LOSSES
    from segprompt.tuning import METHODS

    injected = {"in_channels", "num_classes", "ignore_index", "align_corners", "loss"}
    return {
        "backbone": (BACKBONES, {"in_channels", "class_names"}),
        "head": (HEADS, injected),
        "loss": (LOSSES, {"ignore_index"}),
        "tuning": (METHODS, set()),
    }


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


# ----------------------------------------------------------------------------------------------
# Shipped recipes and how a recipe name resolves (docs/recipes.md)


def shipped_recipes() -> Path:
    """The folder of the recipes that ship with segprompt: the repository's top-level ``recipes/``,
    installed as the package ``segprompt.recipes`` (an editable install maps it to the checkout)."""
    root = importlib.resources.files("segprompt.recipes")
    if not isinstance(root, Path):
        raise SegpromptError(f"segprompt's shipped recipes are inside an archive ({root}); install segprompt "
                             f"with pip so that its files lie on disk")
    return root


def shipped_name(path: str | Path) -> str | None:
    """``path`` as a shipped recipe name (``spm/ade20k_r101_spm.yaml``), or None outside them."""
    try:
        return Path(path).resolve().relative_to(shipped_recipes().resolve()).as_posix()
    except ValueError:
        return None


def _shipped_candidate(name: str | Path) -> Path | None:
    """The shipped recipe a bare name means: ``.yaml`` optional, a leading ``recipes/`` ignored."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    if rel.parts[0] == "recipes" and len(rel.parts) > 1:
        rel = Path(*rel.parts[1:])
    root = shipped_recipes()
    for cand in (root / rel, root / rel.with_name(rel.name + ".yaml")):
        if cand.is_file():
            return cand
    return None


def _closest_shipped(name: str | Path) -> str:
    root = shipped_recipes()
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")
             if "tables" not in p.relative_to(root).parts]
    key = Path(name).as_posix().removeprefix("recipes/").removesuffix(".yaml")
    m = difflib.get_close_matches(key, names, n=1)
    return f"Did you mean '{m[0]}'? " if m else ""


def resolve_recipe(name: str | Path, folder: Path | None = None) -> Path:
    """The recipe file ``name`` means: an existing file (relative to ``folder`` for a ``base:``,
    else to the working directory) is that file; otherwise ``name`` is a shipped recipe, ``.yaml``
    optional and a leading ``recipes/`` ignored (``smoke``, ``spm/ade20k_r101_spm``)."""
    local = Path(folder, name) if folder is not None else Path(name)
    if local.is_file():
        return local
    shipped = _shipped_candidate(name)
    if shipped is not None:
        return shipped
    if local.is_dir():
        inside = next(iter(sorted(local.glob("*.yaml"))), None)
        raise SegpromptError(f"recipe '{local}' is a directory; pass a YAML recipe file"
                             + (f", e.g. '{inside}'" if inside else ""))
    raise SegpromptError(f"recipe '{local}' does not exist, and '{name}' is not a shipped recipe (those are under "
                         f"{shipped_recipes()}). {_closest_shipped(name)}Give a recipe file, or the name of a "
                         f"shipped one such as smoke or spm/ade20k_r101_spm")


# ----------------------------------------------------------------------------------------------
# Loading and merging


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-4`` is a string; recipes mean a float (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)
# ints keep their own (earlier-registered) resolver only if we re-add it after the float one
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _Loader.yaml_implicit_resolvers[_first] = sorted(
        _resolvers, key=lambda r: r[0] != "tag:yaml.org,2002:int")


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclass
class _Source:
    """Which file (or `--set`) set each key path, for error messages."""

    origin: dict[str, str] = field(default_factory=dict)

    def of(self, path: str) -> str:
        while path:
            if path in self.origin:
                return self.origin[path]
            path = path.rpartition(".")[0]
        return self.origin.get("", "<recipe>")


def _record(src: _Source, d: Any, prefix: str, where: str) -> None:
    src.origin[prefix] = where
    if isinstance(d, dict):
        for k, v in d.items():
            _record(src, v, f"{prefix}.{k}" if prefix else str(k), where)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        if isinstance(b, dict) and isinstance(v, dict) and not (
            "name" in v and "name" in b and v["name"] != b["name"]
        ):
            out[k] = _merge(b, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, referrer: Path | None = None) -> dict:
    if path.is_dir():
        raise SegpromptError(f"recipe '{path}' is a directory; pass a YAML recipe file, e.g. "
                             f"'{next(iter(sorted(path.glob('*.yaml'))), path / 'NAME.yaml')}'")
    if not path.is_file():
        if referrer is not None:
            raise SegpromptError(f"base recipe '{path}' does not exist; 'base:' in '{referrer}' names it "
                                 f"(base paths are relative to the recipe's folder)")
        raise SegpromptError(f"recipe '{path}' does not exist")
    try:
        d = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise SegpromptError(f"recipe '{path}' is not valid YAML{where}: {' '.join(what.split())}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SegpromptError(f"recipe '{path}' must be a mapping of sections, got {type(d).__name__}")
    return d


def _load_tree(path: Path, src: _Source, stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise SegpromptError(f"recipe inheritance loops: {chain}")
    d = _read_yaml(path, stack[-1] if stack else None)
    bases = d.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise SegpromptError(f"{path}: 'base' must be a file name or a list of file names")
    merged: dict = {}
    for b in bases:
        try:
            base = resolve_recipe(b, folder=path.parent)
        except SegpromptError as e:
            raise SegpromptError(f"{path}: base '{b}': {e}") from None
        merged = _merge(merged, _load_tree(base, src, (*stack, path)))
    root = src.origin.get("")
    _record(src, d, "", str(path))
    src.origin[""] = root or str(path)
    return _merge(merged, d)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], YAML-parsed value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SegpromptError(f"--set '{item}': expected KEY.PATH=VALUE, e.g. --set optimizer.lr=0.02")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SegpromptError(f"--set '{item}': the value is not valid YAML ({e})") from e
    return key.strip().split("."), value


def _apply_override(tree: dict, keys: list[str], value: Any, item: str) -> None:
    node: Any = tree
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, k, keys[: i + 1], item)]
            continue
        if k not in node or node[k] is None:
            node[k] = {}
        node = node[k]
        if not isinstance(node, (dict, list)):
            raise SegpromptError(f"--set '{item}': '{'.'.join(keys[: i + 1])}' is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, keys, item)] = value
    else:
        node[last] = value


def _list_index(node: list, k: str, keys: list[str], item: str) -> int:
    try:
        idx = int(k)
        node[idx]
    except (ValueError, IndexError):
        raise SegpromptError(
            f"--set '{item}': '{'.'.join(keys)}' indexes a list of {len(node)} items; use 0..{len(node) - 1}"
        ) from None
    return idx


def resolve_tree(path: str | Path, overrides: list[str] = (), tree: dict | None = None) -> tuple[dict, _Source]:
    """The recipe file ``path`` (or, given ``tree``, that recipe as a dict, e.g. a checkpoint's
    ``config``; messages then name ``path``) over the defaults, with ``--set`` overrides."""
    src = _Source({"": "<defaults>"})
    if tree is None:
        tree = _load_tree(resolve_recipe(path), src)
    else:
        _record(src, tree, "", str(path))
    tree = _merge(Recipe().to_dict(), tree)
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(tree, keys, value, item)
        _record(src, value, ".".join(keys), f"--set {item}")
    return tree, src


def load_recipe(path: str | Path, overrides: list[str] = (), tree: dict | None = None) -> Recipe:
    """Load, merge and validate a recipe (``tree``: already read, from ``path``); raises
    SegpromptError with a precise message."""
    tree, src = resolve_tree(path, overrides, tree)
    return validate(tree, src)


def load_yaml_as(path: str | Path, tp: type) -> Any:
    """Read a YAML file and validate it against the dataclass ``tp`` with the recipe rules
    (unknown keys, types, messages naming the file)."""
    src = _Source({"": str(path)})
    tree = _read_yaml(Path(path))
    _record(src, tree, "", str(path))
    return _check(tree, tp, "", src)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------------------------
# Validation


def validate(tree: dict, src: _Source) -> Recipe:
    recipe = _check(tree, Recipe, "", src)
    _check_relations(recipe, src)
    return recipe


def _check_relations(r: Recipe, src: _Source) -> None:
    """Rules that tie two keys together (each key's own range is checked by its type)."""
    ev = r.evaluation
    if ev.mode == "slide" and (ev.crop_size is None or ev.stride is None):
        _fail(src, "evaluation.mode", "evaluation.mode 'slide' needs evaluation.crop_size and evaluation.stride "
                                      "(window and step, [h, w]); set both, or use mode 'whole'")
    if ev.crop_size is not None and ev.stride is not None and any(
            s > c for s, c in zip(ev.stride, ev.crop_size)):
        _fail(src, "evaluation.stride", f"evaluation.stride {list(ev.stride)} must not exceed evaluation.crop_size "
                                        f"{list(ev.crop_size)} (windows would leave gaps)")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Annotated:
        base, rng = typing.get_args(tp)
        return f"{_type_name(base)} {rng}" if isinstance(rng, Range) else "a component mapping with 'name'"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _fail(src: _Source, path: str, msg: str) -> typing.NoReturn:
    raise SegpromptError(f"{src.of(path)}: {msg}")


def _closest(key: str, valid: list[str]) -> str:
    m = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean '{m[0]}'?" if m else ""


def _check(value: Any, tp: Any, path: str, src: _Source) -> Any:
    origin = typing.get_origin(tp)
    shown = path or "<top level>"
    if tp is Any:
        return value
    if origin is typing.Annotated:
        base, kind = typing.get_args(tp)
        if isinstance(kind, Range):
            value = _check(value, base, path, src)
            if value not in kind:
                _fail(src, path, f"'{shown}' must be {_type_name(tp)}, got {value!r}")
            return value
        return _check_component(value, kind, path, src)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, path, src)
            except SegpromptError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        _fail(src, path, f"'{shown}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            _fail(src, path, f"'{shown}' must be {_type_name(tp)}, got {value!r}"
                  + _closest(str(value), [str(a) for a in allowed]))
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(src, path, f"'{shown}' must be {_type_name(tp)}, got {value!r}")
        return _check_dataclass(value, tp, path, src)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(src, path, f"'{shown}' must be {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                _fail(src, path, f"'{shown}' must be {_type_name(tp)}, got {value!r}")
            return tuple(_check(v, a, f"{path}.{i}", src) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_check(v, inner, f"{path}.{i}", src) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            _fail(src, path, f"'{shown}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(src, path, f"'{shown}' must be bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(src, path, f"'{shown}' must be int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(src, path, f"'{shown}' must be float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(src, path, f"'{shown}' must be str, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _check_dataclass(value: dict, tp: type, path: str, src: _Source) -> Any:
    hints = typing.get_type_hints(tp, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(tp)}
    for k in value:
        if k not in fields:
            key = f"{path}.{k}" if path else str(k)
            valid = [f"{path}.{n}" if path else n for n in fields]
            _fail(src, key, f"unknown key '{key}'" + _closest(key, valid))
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = _check(value[name], hints[name], key, src)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(src, path, f"'{key}' is required ({_type_name(hints[name])})")
    return tp(**kwargs)


def _check_component(value: Any, kind: str, path: str, src: _Source) -> Component:
    table, injected = _tables()[kind]
    if not isinstance(value, dict) or "name" not in value:
        _fail(src, path, f"'{path}' must be a mapping with 'name' (one of: {', '.join(sorted(table))})")
    name = value["name"]
    if name not in table:
        _fail(src, f"{path}.name", f"'{path}.name' is {name!r}, not one of: {', '.join(sorted(table))}"
              + _closest(str(name), list(table)))
    ctor = table[name]
    sig = inspect.signature(ctor)
    hints = typing.get_type_hints(ctor.__init__ if inspect.isclass(ctor) else ctor, include_extras=True)
    params = {
        p.name: p for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in injected
    }
    out = Component(name=name)
    for k, v in value.items():
        if k == "name":
            continue
        key = f"{path}.{k}"
        if k not in params:
            _fail(src, key, f"unknown key '{key}' for {kind} '{name}'"
                  + _closest(key, [f"{path}.{p}" for p in params]))
        out[k] = _check(v, hints.get(k, Any), key, src)
    for p in params.values():
        if p.default is p.empty and p.name not in out:
            _fail(src, path, f"'{path}.{p.name}' is required for {kind} '{name}'")
    return out


# Keys that change how a run executes, not what it computes: a resume may change them, and
# `segprompt ablate`'s config hash ignores them.
RUNTIME_ONLY_KEYS = ("runtime.num_workers", "runtime.log_interval")


def run_defining_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat dotted keys (``optimizer.lr``), without :data:`RUNTIME_ONLY_KEYS`: two
    runs compute the same thing when these are equal."""
    def flatten(d: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    return {k: v for k, v in flatten(recipe.to_dict(), "").items() if not k.startswith(RUNTIME_ONLY_KEYS)}


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
