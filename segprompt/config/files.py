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


# Recipes are shared between people, so they are untrusted input (docs/recipes.md, "Limits"): parsing
# stays within these bounds whatever the file holds.
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; a bigger file is not one
MAX_NODES = 100_000  # nodes of the document with every alias expanded (a "billion laughs" has 10^9)
MAX_DEPTH = 64  # nesting levels (recipes use about 6; PyYAML's scanner slows quadratically with depth)
MAX_SCALAR = 10_000  # characters of one value (a path or a name is far shorter)


class RecipeTooBig(ValueError):
    """A YAML document beyond :data:`MAX_NODES` or :data:`MAX_DEPTH`, or an alias that contains itself."""


# the YAML core schema: what a recipe can hold (timestamps resolve implicitly from dates)
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp",
                                                   "merge")}


def _expanded_size(root: yaml.Node) -> int:
    """The node count of ``root`` with every alias expanded, in time linear in the *composed* graph:
    PyYAML composes an alias as a second reference to its anchor's node, so each distinct node's
    expanded size is computed once (memo) and a reference back into an unfinished node is a cycle."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if key in active:
            raise RecipeTooBig("an alias refers to a node that contains it (a recursive structure)")
        if depth > MAX_DEPTH:
            raise RecipeTooBig(f"it nests deeper than {MAX_DEPTH} levels")
        active.add(key)
        if node.tag not in _PLAIN_TAGS:
            raise RecipeTooBig(f"the tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed (a recipe "
                               f"holds mappings, lists, strings, numbers, booleans and nulls)")
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v, depth + 1) for v in node.value)
        else:
            if len(node.value) > MAX_SCALAR:
                raise RecipeTooBig(f"a value is {len(node.value):,} characters long (at most {MAX_SCALAR:,})")
            total = 1
        active.discard(key)
        if total > MAX_NODES:
            raise RecipeTooBig(f"it expands to more than {MAX_NODES:,} nodes once its aliases are followed "
                               f"(an alias bomb?)")
        memo[key] = total
        return total

    return size(root, 0)


def _check_flow_depth(text: str) -> None:
    """Refuse nesting beyond :data:`MAX_DEPTH` before PyYAML's scanner sees it: the scanner revisits
    every open level at each token, so 20,000 ``[`` levels take it about a minute and 400 indented
    levels ten seconds. Counted: ``[``/``{`` outside quotes and comments, and increasing indentation
    (a ``- `` item counts as indentation)."""
    depth, quote, indents = 0, "", [0]
    for line in text.splitlines():
        stripped = line.lstrip(" -")
        if stripped and not stripped.startswith("#") and not depth:  # block nesting: indentation levels
            indent = len(line) - len(stripped)
            while indent < indents[-1]:
                indents.pop()
            if indent > indents[-1]:
                indents.append(indent)
                if len(indents) > MAX_DEPTH:
                    raise RecipeTooBig(f"it nests deeper than {MAX_DEPTH} levels")
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch in "[{":
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeTooBig(f"it nests deeper than {MAX_DEPTH} levels")
            elif ch in "]}":
                depth = max(depth - 1, 0)


def yaml_load(text: str) -> Any:
    """The YAML 1.2-ish document ``text`` (``_Loader``), refused beyond the bounds above before any
    Python object is built. Raises :class:`RecipeTooBig` or ``yaml.YAMLError``."""
    _check_flow_depth(text)
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise RecipeTooBig(f"it nests deeper than {MAX_DEPTH} levels") from None
        if node is None:
            return None
        _expanded_size(node)
        try:
            return loader.construct_document(node)
        except yaml.YAMLError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. an int of more digits than Python converts, !!timestamp x
            raise RecipeTooBig(f"a value cannot be read ({type(e).__name__}: {e})") from None
    finally:
        loader.dispose()


def yaml_error(e: Exception) -> str:
    """A YAML error in one line, `` at line L, column C: what went wrong`` (PyYAML's own message spans
    lines), to follow "is not valid YAML"."""
    if isinstance(e, RecipeTooBig):
        return f": {e}"
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return f"{where}: {' '.join(what.split())}"


def _not_text(path: Path, data: bytes) -> str:
    """What a binary file given as a recipe probably is, for the message."""
    if data[:2] == b"PK":
        return ("a zip archive: a PyTorch checkpoint (.pt) or similar, not a YAML recipe. To continue a run "
                "use `segprompt train RECIPE --resume PATH`; to start from its weights, --load-from PATH; eval, "
                "predict and export take a run directory or checkpoint directly")
    if data[:1] == b"\x80":
        return "a pickle (an old-style PyTorch checkpoint?), not a YAML recipe"
    return "a binary file, not a YAML recipe (a recipe is UTF-8 text)"


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
        size = path.stat().st_size
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise SegpromptError(f"cannot read recipe '{path}': {e.strerror or e} (errno {e.errno})") from None
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise SegpromptError(f"'{path}' is {_not_text(path, data)}")
    if size > MAX_RECIPE_BYTES:
        raise SegpromptError(f"'{path}' is {size:,} bytes, not a recipe: recipes are YAML text of at most "
                             f"{MAX_RECIPE_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SegpromptError(f"'{path}' is {_not_text(path, data)}") from None
    try:
        d = yaml_load(text)
    except RecipeTooBig as e:
        raise SegpromptError(f"recipe '{path}' is refused: {e}") from None
    except yaml.YAMLError as e:
        raise SegpromptError(f"recipe '{path}' is not valid YAML{yaml_error(e)}") from None
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
    except (yaml.YAMLError, RecipeTooBig) as e:
        raise SegpromptError(f"--set '{item}': the value is not valid YAML{yaml_error(e)}; quote a string, "
                             f"e.g. --set 'key=\"[\"'") from None
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
