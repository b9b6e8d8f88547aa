"""Recipe files: how a recipe name resolves (a file, else a shipped recipe), YAML 1.2 reading,
``base:`` inheritance and ``--set`` overrides, with a record of which file set each key
(``docs/recipes.md``)."""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segprompt.config.schema import Recipe
from segprompt.errors import SegpromptError


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
class RecipeSource:
    """Which file (or `--set`) set each key path, for error messages."""

    origin: dict[str, str] = field(default_factory=dict)

    def of(self, path: str) -> str:
        while path:
            if path in self.origin:
                return self.origin[path]
            path = path.rpartition(".")[0]
        return self.origin.get("", "<recipe>")


def record_sources(src: RecipeSource, d: Any, prefix: str, where: str) -> None:
    """Note ``where`` as the origin of ``d``'s key path ``prefix`` and of every key below it."""
    src.origin[prefix] = where
    if isinstance(d, dict):
        for k, v in d.items():
            record_sources(src, v, f"{prefix}.{k}" if prefix else str(k), where)


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


def read_yaml(path: Path, referrer: Path | None = None) -> dict:
    """A recipe file's mapping; ``referrer`` is the recipe whose ``base:`` named it (for the message)."""
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


def _load_tree(path: Path, src: RecipeSource, stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise SegpromptError(f"recipe inheritance loops: {chain}")
    d = read_yaml(path, stack[-1] if stack else None)
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
    record_sources(src, d, "", str(path))
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


def resolve_tree(path: str | Path, overrides: list[str] = (), tree: dict | None = None) -> tuple[dict, RecipeSource]:
    """The recipe file ``path`` (or, given ``tree``, that recipe as a dict, e.g. a checkpoint's
    ``config``; messages then name ``path``) over the defaults, with ``--set`` overrides."""
    src = RecipeSource({"": "<defaults>"})
    if tree is None:
        tree = _load_tree(resolve_recipe(path), src)
    else:
        record_sources(src, tree, "", str(path))
    tree = _merge(Recipe().to_dict(), tree)
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(tree, keys, value, item)
        record_sources(src, value, ".".join(keys), f"--set {item}")
    return tree, src
