"""``--scale smoke``: every cell shrunk by ``recipes/tables/smoke/profile.yaml`` (synthetic stand-in
datasets, small networks of the same family, short schedules) so a table's machinery runs on a CPU."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from segprompt.config import load_yaml_as, resolve_tree
from segprompt.data.synthetic import generate_synthetic
from segprompt.errors import SegpromptError
from segprompt.experiments.tables import tables_dir

SMOKE_BANNER = "SMOKE SCALE: synthetic data, tiny schedules — not comparable to the paper"


@dataclass
class SyntheticOptions:
    image_size: int = 64
    train: int = 16
    val: int = 8


@dataclass
class StandIn:
    classes: int  # background included
    seed: int = 0


@dataclass
class SmokeProfile:
    synthetic: SyntheticOptions = field(default_factory=SyntheticOptions)
    datasets: dict[str, StandIn] = field(default_factory=dict)  # data.dataset -> its synthetic stand-in
    metrics: dict[str, str] = field(default_factory=dict)  # metric -> the stand-in's metric
    components: dict[str, dict] = field(default_factory=dict)  # component name -> options merged in
    set: list[str] = field(default_factory=list)  # overrides of every cell
    seeds: int | None = None  # keep the first N seeds of a cell; null = all


def smoke_profile_path() -> Path:
    return tables_dir() / "smoke" / "profile.yaml"


def load_smoke_profile(path: Path | None = None) -> SmokeProfile:
    path = path or smoke_profile_path()
    profile = load_yaml_as(path, SmokeProfile)
    for name, spec in profile.datasets.items():  # the schema checker leaves mapping values as read
        if not (isinstance(spec, dict) and isinstance(spec.get("classes"), int) and set(spec) <= {"classes", "seed"}):
            raise SegpromptError(f"{path}: datasets.{name} must be {{classes: K, seed: S}}, got {spec!r}")
        profile.datasets[name] = StandIn(**spec)
    return profile


def smoke_root(data_root: Path, dataset: str) -> Path:
    return Path(data_root) / "ablate_smoke" / dataset


def smoke_overrides(recipe: Path, overrides: list[str], profile: SmokeProfile, data_root: Path) -> list[str]:
    """The overrides that turn a cell into its smoke version (added after the cell's own)."""
    tree, _ = resolve_tree(recipe, overrides)
    dataset = tree["data"]["dataset"]
    if dataset not in profile.datasets:
        raise SegpromptError(f"{smoke_profile_path()}: 'datasets' has no synthetic stand-in for data.dataset "
                             f"'{dataset}' (recipe {recipe}); add '{dataset}: <classes>' to it")
    k = profile.datasets[dataset].classes
    out = ["data.dataset=synthetic", f"data.num_classes={k}", f"data.root={smoke_root(data_root, dataset)}"]
    model = tree["model"]
    parts = [("model.backbone", model["backbone"]), ("model.decode_head", model["decode_head"]),
             *((f"model.aux_heads.{i}", h) for i, h in enumerate(model["aux_heads"])), ("tuning", tree["tuning"])]
    for prefix, spec in parts:
        for key, value in profile.components.get(spec["name"], {}).items():
            out.append(f"{prefix}.{key}={json.dumps(value)}")
    return [*out, *profile.set]


def prepare_smoke_data(roots: Iterable[str], profile: SmokeProfile) -> None:
    """Generate the synthetic stand-ins at ``roots`` (the runs' ``data.root``; idempotent: an
    existing one is reused)."""
    s = profile.synthetic
    for root in sorted(set(roots)):
        spec = profile.datasets[Path(root).name]
        generate_synthetic(root, seed=spec.seed, num_classes=spec.classes, image_size=(s.image_size, s.image_size),
                           counts={"train": s.train, "val": s.val, "test": 0})
