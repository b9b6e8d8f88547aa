"""Strict validation of a merged recipe tree against the schema: unknown keys with the closest valid
one, types, ranges, component options from constructor signatures, and rules tying keys together;
every message names the file (or ``--set``) that set the key."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from segprompt.config.files import RecipeSource, read_yaml, record_sources, resolve_tree
from segprompt.config.schema import Component, Range, Recipe, component_tables
from segprompt.errors import SegpromptError


def load_recipe(path: str | Path, overrides: list[str] = (), tree: dict | None = None) -> Recipe:
    """Load, merge and validate a recipe (``tree``: already read, from ``path``); raises
    SegpromptError with a precise message."""
    tree, src = resolve_tree(path, overrides, tree)
    return validate(tree, src)


def load_yaml_as(path: str | Path, tp: type) -> Any:
    """Read a YAML file and validate it against the dataclass ``tp`` with the recipe rules
    (unknown keys, types, messages naming the file)."""
    src = RecipeSource({"": str(path)})
    tree = read_yaml(Path(path))
    record_sources(src, tree, "", str(path))
    return _check(tree, tp, "", src)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)


def validate(tree: dict, src: RecipeSource) -> Recipe:
    recipe = _check(tree, Recipe, "", src)
    _check_relations(recipe, src)
    return recipe


def _check_relations(r: Recipe, src: RecipeSource) -> None:
    """Rules that tie two keys together (each key's own range is checked by its type)."""
    ev = r.evaluation
    if ev.mode == "slide" and (ev.crop_size is None or ev.stride is None):
        _fail(src, "evaluation.mode", "evaluation.mode 'slide' needs evaluation.crop_size and evaluation.stride "
                                      "(window and step, [h, w]); set both, or use mode 'whole'")
    if ev.crop_size is not None and ev.stride is not None and any(
            s > c for s, c in zip(ev.stride, ev.crop_size)):
        _fail(src, "evaluation.stride", f"evaluation.stride {list(ev.stride)} must not exceed evaluation.crop_size "
                                        f"{list(ev.crop_size)} (windows would leave gaps)")
    _check_crop(r.data.train, src)


def _check_crop(tr: Any, src: RecipeSource) -> None:
    """A training crop larger than any image the resize can produce is padded (to the crop size,
    with ignored labels: there is no separate pad size) on every sample, so most of each crop is
    padding. The bound is conservative: after a resize to ``scale`` (× ``ratio_range``'s top) no
    side exceeds the larger scale value, whatever the image's shape or ``keep_ratio``."""
    if tr.crop_size is None or (tr.scale is None and not tr.scales):
        return
    top = max(tr.ratio_range) if tr.ratio_range and tr.scale is not None else 1.0
    longest = max(max(s) for s in (tr.scales or [tr.scale])) * top
    if max(tr.crop_size) > longest:
        key = "data.train.scales" if tr.scales else "data.train.scale"
        _fail(src, "data.train.crop_size",
              f"data.train.crop_size {list(tr.crop_size)} is larger than any training image can be after the resize "
              f"({key} {[list(s) for s in tr.scales] if tr.scales else list(tr.scale)}"
              + (f" x ratio_range up to {top:g}" if top != 1.0 else "") + f": at most {longest:g} pixels a side), "
              f"so every crop would be mostly padding with ignored labels; lower crop_size or raise {key}")


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


def _fail(src: RecipeSource, path: str, msg: str) -> typing.NoReturn:
    raise SegpromptError(f"{src.of(path)}: {msg}")


def _closest(key: str, valid: list[str]) -> str:
    m = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean '{m[0]}'?" if m else ""


# scalar type -> (its name in messages, what a YAML value of it may be); YAML's true/false are not numbers
_SCALARS = {
    bool: ("bool (true/false)", lambda v: isinstance(v, bool)),
    int: ("int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("float", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("str", lambda v: isinstance(v, str)),
}


def _check(value: Any, tp: Any, path: str, src: RecipeSource) -> Any:
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
    if tp in _SCALARS:
        name, ok = _SCALARS[tp]
        if not ok(value):
            _fail(src, path, f"'{shown}' must be {name}, got {value!r}")
        return float(value) if tp is float else value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _check_dataclass(value: dict, tp: type, path: str, src: RecipeSource) -> Any:
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


def _check_component(value: Any, kind: str, path: str, src: RecipeSource) -> Component:
    table, injected = component_tables()[kind]
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
RUNTIME_ONLY_KEYS = ("runtime.num_workers", "runtime.log_interval", "runtime.tensorboard", "runtime.loggers",
                     "runtime.project")


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


def config_diff(a: Recipe, b: Recipe, limit: int = 6) -> str | None:
    """The run-defining keys where ``a`` and ``b`` differ, as ``key: A vs B`` (at most ``limit``
    of them), or None when the two runs compute the same thing."""
    x, y = run_defining_config(a), run_defining_config(b)
    keys = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    if not keys:
        return None
    return "; ".join(f"{k}: {x.get(k)!r} vs {y.get(k)!r}" for k in keys[:limit])

