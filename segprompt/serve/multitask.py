"""Many tasks on one frozen backbone: each run's delta on shared frozen weights (docs/multitask.md).

A trainable-only checkpoint holds what training changed (prompts, SPMs, adapters, LoRA matrices,
biases, heads) and records where the frozen weights come from (``frozen_source``: the pretrained
file's SHA-256, or the seed). :meth:`MultiTaskModel.from_runs` builds each task's model on the
``meta`` device (no memory), gives it the tensors of its checkpoint, and points every tensor that
is still missing at one shared copy of the frozen backbone, loaded once. Each task is therefore
its own module tree (its inserted modules and hooks are simply absent from the other trees) whose
frozen tensors are the same storage as every other task's. A task switch is a different tree,
no reload; a mixed batch is grouped by task, each group run through its tree, and the outputs
scattered back into batch order.

A method that changes frozen weights (bias tuning, partial, full, ``bn_eval: false``) keeps its own
copy of exactly the tensors its checkpoint holds; the rest stay shared. Tasks that use shared
tensors must record the same frozen weights and the same backbone configuration, or are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segprompt.build import apply_tuning, build_segmentor, build_test_transform
from segprompt.config import Recipe, load_recipe
from segprompt.data.meta import DatasetMeta
from segprompt.data.transforms import normalize, to_tensor
from segprompt.distributed import resolve_device
from segprompt.errors import SegpromptError
from segprompt.runs import checkpoint as ckpt
from segprompt.runs.delta import is_delta
from segprompt.runs.load import read_source
from segprompt.runs.rundir import CONFIG
from segprompt.serve.segmenter import load
from segprompt.tuning import TuningContext

__all__ = ["MultiTaskModel", "Task", "load_run_model"]


@dataclass
class Task:
    """One served run: what ``predict`` needs to preprocess, run and colour an image for it."""

    name: str
    run_dir: Path
    checkpoint: Path
    cfg: Recipe  # the run's resolved recipe: cfg.data.test (scale), mean/std, evaluation (mode, crop)
    meta: DatasetMeta  # classes, palette, ignore index
    iteration: int | None
    # tensors of the frozen backbone this task holds its own copy of (what its method changed)
    own_frozen: list[str] = field(default_factory=list)
    shares_backbone: bool = True

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def palette(self) -> list[list[int]]:
        return self.meta.palette

    @property
    def method(self) -> str:
        return self.cfg.tuning["name"]

    def preprocess(self, image: np.ndarray) -> Tensor:
        """An RGB uint8 (H, W, 3) image (``segprompt.data.dataset.read_image``) as this task's
        model takes it, as `segprompt eval` prepares it: resized by the run's ``data.test``, then
        normalised with its ``data.mean`` / ``data.std``; a (3, h, w) float32 tensor."""
        return normalize(to_tensor(build_test_transform(self.cfg)(image)), self.cfg.data.mean, self.cfg.data.std)


class MultiTaskModel:
    """Several runs that share one frozen backbone, for inference (every tree stays in eval mode).

    ``model(images, tasks)`` takes normalised images, a (B, 3, H, W) tensor or a list of
    (3, H, W) tensors of any sizes, and one task name per image (or one name for all). It returns
    a list of B logits, ``(K_task, H, W)`` at each image's size (``(K_task,)`` for a classifier),
    since tasks may differ in their number of classes. ``model.model(name)`` is that task's own
    ``nn.Module`` (for sliding-window or TTA inference, :func:`segprompt.evaluation.inference.inference`).
    """

    def __init__(self, tasks: dict[str, Task], models: dict[str, nn.Module], device: torch.device):
        self._tasks = tasks
        self._models = models
        self.device = device

    @classmethod
    def from_runs(cls, runs: Sequence[str | Path] | Mapping[str, str | Path], checkpoint: str = "best",
                  device: str | torch.device = "cpu", weights: str | Path | None = None) -> MultiTaskModel:
        """Load run directories (``segprompt train``'s, each with ``config.yaml`` and
        ``checkpoints/``) or deltas (``export --format delta``); ``checkpoint`` is ``best``, ``last``
        or a file name in ``checkpoints/``; ``weights`` is the shared frozen backbone's file when it
        is not where the runs recorded it (checked by its SHA-256).
        A mapping gives the task names; otherwise each task is named by the shortest tail of its
        path that tells the runs apart. The frozen backbone is loaded once (once per
        ``runtime.seed`` among the runs; tensors equal across seeds are then shared too)."""
        named = task_names(runs)
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        builder = _Builder(dev)
        tasks, models = {}, {}
        for name, run_dir in named.items():
            task, state = _load_task(name, run_dir, checkpoint, weights)
            models[name] = builder.build(task, state)
            tasks[name] = task
        return cls(tasks, models, dev)

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def task(self, name: str) -> Task:
        return self._tasks[self._check_name(name)]

    def model(self, name: str) -> nn.Module:
        return self._models[self._check_name(name)]

    def _check_name(self, name: str) -> str:
        if name not in self._tasks:
            raise SegpromptError(f"unknown task '{name}'; this model serves {', '.join(self._tasks)}")
        return name

    @torch.no_grad()
    def __call__(self, images: Tensor | Sequence[Tensor], tasks: str | Sequence[str], *,
                 view: Tensor | None = None) -> list[Tensor]:
        """Route each image to its task (see the class docstring); ``view`` (B, 5) is each input's
        view (:mod:`segprompt.data.view`), ``None`` for whole images."""
        n = len(images)
        names = [tasks] * n if isinstance(tasks, str) else list(tasks)
        if len(names) != n:
            raise SegpromptError(f"{n} images but {len(names)} task names; give one task per image")
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault((self._check_name(name), tuple(images[i].shape[-3:])), []).append(i)
        out: list[Tensor | None] = [None] * n
        for (name, _), idx in groups.items():
            if isinstance(images, Tensor):
                x = images if idx == list(range(n)) else images[torch.tensor(idx, device=images.device)]
            else:
                x = torch.stack([images[i] for i in idx])
            v = None if view is None else view[torch.tensor(idx, device=view.device)].to(self.device)
            logits = self._models[name](x.to(self.device), view=v)
            for j, i in enumerate(idx):
                out[i] = logits[j]
        return out

    def footprint(self) -> dict[str, Any]:
        """Bytes of tensor storage: ``shared`` (used by two or more tasks, counted once) and, per
        task, ``tasks[name]`` (storage only that task uses: its delta and its own frozen copies)."""
        users: dict[int, set[str]] = {}
        sizes: dict[int, int] = {}
        for name, model in self._models.items():
            for t in _tensors(model):
                storage = t.untyped_storage()
                users.setdefault(storage.data_ptr(), set()).add(name)
                sizes[storage.data_ptr()] = storage.nbytes()
        own = {name: 0 for name in self._models}
        shared = 0
        for ptr, names in users.items():
            if len(names) > 1:
                shared += sizes[ptr]
            else:
                own[next(iter(names))] += sizes[ptr]
        return {"shared": shared, "tasks": own, "total": shared + sum(own.values())}


def _tensors(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def task_names(runs: Sequence[str | Path] | Mapping[str, str | Path]) -> dict[str, Path]:
    """``{task name: run directory}``: a mapping's own names, or for a list the shortest tail of
    each resolved path that tells the runs apart (``a/20240101``, ``b/20240101``)."""
    if isinstance(runs, Mapping):
        named = {str(k): Path(v) for k, v in runs.items()}
    else:
        paths = [Path(r) for r in runs]
        if not paths:
            raise SegpromptError("no runs given: pass one or more run directories")
        resolved = [p.resolve() for p in paths]
        twice = sorted({str(p) for p in paths if resolved.count(p.resolve()) > 1})
        if twice:
            raise SegpromptError(f"run {twice[0]} is given twice; give each run once")
        depth = 1
        while len({_tail(p, depth) for p in resolved}) < len(resolved):
            depth += 1
        named = {_tail(r, depth): p for r, p in zip(resolved, paths)}
    if not named:
        raise SegpromptError("no runs given: pass one or more run directories")
    return named


def _tail(path: Path, depth: int) -> str:
    return "/".join(path.parts[-depth:])


def _load_task(name: str, run_dir: Path, checkpoint: str, weights: str | Path | None = None
               ) -> tuple[Task, dict[str, Any]]:
    """The run's (or delta's) recipe, classes and checkpoint (read as every loader reads them,
    :func:`~segprompt.runs.load.read_source`); refuses what cannot share a backbone."""
    if is_delta(run_dir):
        src = read_source(run_dir, weights=weights)
        if src.cfg.model.backbone.get("text"):
            raise SegpromptError(f"task '{name}' ({run_dir}) has a text-guided backbone (model.backbone.text): it "
                                 f"cannot be shared; serve it alone (docs/multitask.md)")
        return Task(name=name, run_dir=run_dir, checkpoint=src.path, cfg=src.cfg, meta=src.meta,
                    iteration=src.state.get("iteration")), src.state
    if not (run_dir / CONFIG).is_file():
        raise SegpromptError(f"task '{name}': '{run_dir}' is not a run directory ('{run_dir / CONFIG}' is missing) "
                             f"or a delta; pass the folder `segprompt train` wrote")
    if load_recipe(run_dir / CONFIG).model.backbone.get("text"):
        raise SegpromptError(f"task '{name}' ({run_dir}) has a text-guided backbone (model.backbone.text): its "
                             f"backbone depends on the task's class names, so it cannot be shared; serve it "
                             f"alone (docs/multitask.md)")
    src = read_source(run_dir, checkpoint, weights=weights)
    if src.state.get("full_model"):
        raise SegpromptError(f"task '{name}': checkpoint '{src.path}' stores the whole model "
                             f"(checkpoint.save_full_model or a deployed model), not what training changed, so "
                             f"nothing in it is known to be the shared frozen backbone; pass a trainable-only "
                             f"checkpoint (best.pt or last.pt of a run with checkpoint.save_full_model: false) or "
                             f"serve it alone")
    task = Task(name=name, run_dir=run_dir, checkpoint=src.path, cfg=src.cfg, meta=src.meta,
                iteration=src.state.get("iteration"))
    return task, src.state


def load_run_model(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> nn.Module:
    """One run's model alone, built as `segprompt eval` builds it (pretrained file, checkpoint):
    what a task of :class:`MultiTaskModel` reproduces exactly, at the cost of its own backbone."""
    return load(run_dir, checkpoint, device=device).model


def _identity(task: Task, state: dict[str, Any]) -> tuple[str, str, str]:
    """What determines the frozen weights: the backbone configuration, the frozen source (file
    SHA-256 or seed) and the ``--load-from`` checkpoint's SHA-256 (or '')."""
    src = state.get("frozen_source") or {}
    if src.get("type") == "file":
        source = f"file sha256 {src['sha256']} ('{src['path']}')"
    elif src.get("type") == "seed":
        source = f"random initialisation with seed {src['seed']}"
    else:
        source = "unrecorded (the checkpoint has no frozen_source)"
    init = (src.get("init") or {}).get("sha256", "")
    return json.dumps(dict(task.cfg.model.backbone), sort_keys=True), source, init


class _Builder:
    """Builds each task's tree, sharing the frozen backbone tensors among them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reference: tuple[str, tuple[str, str, str]] | None = None  # (task, identity) of the first sharer
        self.bases: dict[tuple[tuple[str, str, str], int], dict[str, Tensor]] = {}
        self.inits: dict[Path, dict[str, Tensor]] = {}

    def build(self, task: Task, state: dict[str, Any]) -> nn.Module:
        where = str(task.checkpoint)
        ctx = TuningContext(num_classes=task.num_classes, ignore_index=task.meta.ignore_index)
        with torch.device("meta"):  # no memory: every tensor comes from the checkpoint or the shared backbone
            model = build_segmentor(task.cfg, task.meta, load_pretrained=False)
            slots = _backbone_slots(model.backbone)
            apply_tuning(model, task.cfg, ctx)
        # each backbone tensor's name in the tuned model (LoRA moves conv.weight to conv.base_layer.weight)
        tuned = {id(t): n for n, t in [*model.named_parameters(remove_duplicate=False),
                                       *model.named_buffers(remove_duplicate=False)]}
        key = {name: tuned.get(id(_get(s))) for name, s in slots.items()}
        own = model.state_dict()
        delta = {k: v.to(self.device, own[k].dtype) if k in own else v for k, v in state["model"].items()}
        ckpt.load_model_state(model, delta, where, assign=True)
        from_init = self._load_init(model, state, delta, where)
        missing = [name for name in slots if key[name] not in delta and key[name] not in from_init]
        task.own_frozen = sorted(name for name in slots if key[name] in delta)
        task.shares_backbone = bool(missing or from_init)
        if task.shares_backbone:  # it takes frozen tensors it does not hold: they must be the others'
            self._check_identity(task, state)
        if missing:
            base = self._base(task, state)
            for name in missing:
                _set(slots[name], base[name])
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise SegpromptError(f"task '{task.name}': checkpoint '{where}' lacks tensors that are not part of the "
                                 f"shared frozen backbone: {left[:6]}{' ...' if len(left) > 6 else ''} (frozen "
                                 f"outside the backbone); serve this run alone")
        model.eval()
        model.train = _eval_only(task.name, model)  # training mode would move the shared BatchNorm statistics
        return model

    def _load_init(self, model: nn.Module, state: dict[str, Any], delta: dict[str, Tensor], where: str) -> set[str]:
        """A ``--load-from`` run's frozen tensors come from its initial checkpoint, as in
        :func:`segprompt.runs.checkpoint.restore_frozen`: every tensor of the tuned model named
        in that file, unless the run's own checkpoint holds it. Loaded once, shared by the tasks."""
        path = ckpt.frozen_init(state, where)
        if path is None:
            return set()
        if path not in self.inits:
            self.inits[path] = ckpt.init_tensors(ckpt.load_checkpoint(path), path)
        init = self.inits[path]
        own = model.state_dict()
        wanted = [k for k in own if k in init and k not in delta]
        for k in wanted:
            if init[k].device != self.device or init[k].dtype != own[k].dtype:
                init[k] = init[k].to(self.device, own[k].dtype)
        ckpt.load_model_state(model, {k: init[k] for k in wanted}, str(path), allow_partial=True, assign=True)
        return set(wanted)

    def _check_identity(self, task: Task, state: dict[str, Any]) -> None:
        """Every task that takes shared frozen tensors was trained on the same frozen weights."""
        identity = _identity(task, state)
        if self.reference is None:
            self.reference = (task.name, identity)
        elif identity != self.reference[1]:
            raise SegpromptError(_mismatch(self.reference, (task.name, identity)))

    def _base(self, task: Task, state: dict[str, Any]) -> dict[str, Tensor]:
        """The frozen backbone's tensors for this task, built once per (frozen weights, seed)."""
        key = (_identity(task, state), task.cfg.runtime.seed)
        if key not in self.bases:
            if not state.get("frozen_source"):
                raise SegpromptError(f"task '{task.name}': checkpoint '{task.checkpoint}' records no frozen_source, "
                                     f"so its frozen weights are unknown; retrain it with this segprompt")
            # model.pretrained is the frozen weights file read_source found and checked by its SHA-256
            backbone = build_segmentor(task.cfg, task.meta).backbone.to(self.device)
            tensors = _named_tensors(backbone)
            for other in self.bases.values():  # another seed, same file: share what is equal
                for name, t in tensors.items():
                    if other[name] is not t and other[name].shape == t.shape and torch.equal(other[name], t):
                        tensors[name] = other[name]
            self.bases[key] = tensors
        return self.bases[key]


def _eval_only(name: str, model: nn.Module):
    def train(mode: bool = True) -> nn.Module:
        if mode:
            raise SegpromptError(f"task '{name}' of a MultiTaskModel is for inference only: its frozen tensors are "
                                 f"shared with the other tasks, and training mode would update their BatchNorm "
                                 f"statistics for all of them; train the run with `segprompt train`")
        return model
    return train


def _mismatch(first: tuple[str, tuple[str, str, str]], other: tuple[str, tuple[str, str, str]]) -> str:
    (a, (bb_a, src_a, init_a)), (b, (bb_b, src_b, init_b)) = first, other
    if bb_a != bb_b:
        what = f"backbone {bb_b} vs {bb_a}"
    elif src_a != src_b:
        what = f"frozen weights {src_b} vs {src_a}"
    else:
        what = f"initial checkpoint (--load-from) sha256 {init_b[:12] or 'none'} vs {init_a[:12] or 'none'}"
    return (f"task '{b}' was not trained on the same frozen backbone as task '{a}' ({what}); tasks can share one "
            f"backbone only when trained on the same frozen weights (docs/multitask.md): serve them separately")


Slot = tuple[nn.Module, str, bool]  # (module, attribute, is a parameter)


def _backbone_slots(backbone: nn.Module) -> dict[str, Slot]:
    """Every tensor of the untuned backbone, by name, as (module, attribute): tuning may wrap a
    module (LoRA renames ``conv.weight`` to ``conv.base_layer.weight``) but keeps the object."""
    slots = {}
    for mod_name, m in backbone.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in m._parameters.items():
            if p is not None:
                slots[prefix + attr] = (m, attr, True)
        for attr, b in m._buffers.items():
            if b is not None:
                slots[prefix + attr] = (m, attr, False)
    return slots


def _named_tensors(backbone: nn.Module) -> dict[str, Tensor]:
    return {name: _get(s) for name, s in _backbone_slots(backbone).items()}


def _get(slot: Slot) -> Tensor:
    m, attr, is_param = slot
    return (m._parameters if is_param else m._buffers)[attr]


def _set(slot: Slot, tensor: Tensor) -> None:
    m, attr, is_param = slot
    if is_param:  # a Parameter of this tree over the shared storage: flags stay per task
        m._parameters[attr] = nn.Parameter(tensor.detach(), requires_grad=False)
    else:
        m._buffers[attr] = tensor
