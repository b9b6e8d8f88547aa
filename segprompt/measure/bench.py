"""`segprompt bench`: parameters, FLOPs and inference speed of a recipe's model as deployed, with
the FPS protocol of CLIP-distilled STDC-Seg (Sec. 4, Tables 1-2; ``docs/measurement.md``: "FLOPs" for
the counting rules, "Speed" for the FPS protocol).

* **Model** (:func:`bench_model`): the recipe's network built without pretrained files (random
  weights, as the paper's protocol allows), tuning applied, learned text prompts deployed into a
  fixed K x 1024 buffer (:func:`~segprompt.models.text.guidance.deploy_text`), eval mode.
* **Counts** (:func:`model_costs`): ``params`` = every parameter of that model (auxiliary and
  detail heads included: the paper's "#Params"), ``params_inference`` = the parameters that
  ``model(img)`` in eval mode actually reads (backbone, context path, decode head), and
  ``flops_mmcv`` / ``flops_torch`` from :mod:`segprompt.measure.flops`.
* **Timing** (:func:`run_bench`): batch 1 at ``size``; a random input made on the device once; the
  eval forward (main logits resized to the input) and nothing else in the loop. ``warmup`` runs,
  then a calibration pass of ``calib_iters`` iterations doubled until one pass takes at least
  ``calib_seconds``, then ``chunks`` timed chunks that together last about ``seconds``, each
  ended by a device synchronisation. latency = time / iterations, FPS = 1000 / latency (ms).
  With a second model (``--vs``) the two are timed in alternating chunks (A B A B ...), the same
  number each, so clock or thermal drift touches both alike. An ``.onnx`` file from ``segprompt
  export`` is timed by the same loop on onnxruntime (:mod:`segprompt.measure.ort_bench`).
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from segprompt import __version__
from segprompt.config import Recipe
from segprompt.data.meta import DatasetMeta
from segprompt.distributed import resolve_device
from segprompt.errors import SegpromptError
from segprompt.io import write_json_keeping_history
from segprompt.measure.flops import mmcv_flops, torch_flops
from segprompt.measure.ort_bench import OrtModel, is_onnx
from segprompt.runs.load import run_recipe
from segprompt.runs.rundir import git_commit
from segprompt.runs.runlock import refuse_live_run

# the deployed model of a recipe (random weights) lives in serve/deployed.py, which `segprompt export` shares
from segprompt.serve.deployed import random_model as bench_model
from segprompt.serve.deployed import recipe_meta as bench_meta
from segprompt.serve.export import PROVIDERS

# the paper's measuring sizes (H, W): Cityscapes at half resolution, CamVid at full (Tables 1-2)
DEFAULT_SIZES = {"cityscapes": (512, 1024), "camvid": (720, 960)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")
COST_KEYS = ("params", "params_inference", "flops_mmcv", "flops_torch")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # reduce-overhead: CUDA graphs on a GPU
BENCH_FILE = "bench.json"
HISTORY_DIR = "bench_history"


@dataclass
class BenchOptions:
    """Every knob of a measurement; all of them are recorded in the result."""

    size: tuple[int, int] | None = None  # (H, W); None = default_size(cfg)
    dtype: str = "fp32"  # the model and input are cast to it (as a deployed FP16/BF16 engine)
    channels_last: bool = False
    compile: bool = False  # torch.compile
    compile_mode: str = "default"  # its mode: default | reduce-overhead (CUDA graphs) | max-autotune
    device: str = "auto"
    warmup: int = 10
    # the paper starts at 100 iterations; starting lower ends in the same >= calib_seconds pass
    # and does not overshoot on a slow device (100 CPU passes at 512x1024 take about a minute)
    calib_iters: int = 1
    calib_seconds: float = 1.0
    seconds: float = 3.0
    chunks: int = 5
    threads: int | None = None  # torch CPU threads (None: leave torch's default); onnxruntime's intra-op threads
    provider: str | None = None  # ONNX files: onnxruntime's cpu | cuda | tensorrt (None: after the device)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise SegpromptError(f"--dtype '{self.dtype}' is not one of: {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise SegpromptError(f"--device '{self.device}' is not one of: {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SegpromptError("--device cuda but no CUDA device is visible; use --device cpu (or auto)")
        for name, value, low in (("--warmup", self.warmup, 0), ("--calib-iters", self.calib_iters, 1),
                                 ("--chunks", self.chunks, 1)):
            if value < low:
                raise SegpromptError(f"{name} must be at least {low}, got {value}")
        for name, value in (("--seconds", self.seconds), ("--calib-seconds", self.calib_seconds)):
            if not value > 0:
                raise SegpromptError(f"{name} must be > 0, got {value}")
        if self.provider is not None and self.provider not in PROVIDERS:
            raise SegpromptError(f"--provider '{self.provider}' is not one of: {', '.join(PROVIDERS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise SegpromptError(f"--compile-mode '{self.compile_mode}' is not one of: {', '.join(COMPILE_MODES)}")
        if self.threads is not None and self.threads < 1:
            raise SegpromptError(f"--threads must be at least 1, got {self.threads}")


def parse_size(text: str) -> tuple[int, int]:
    """``"512x1024"`` -> (512, 1024) = (H, W)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise SegpromptError(f"--size '{text}' is not HxW (height x width in pixels), e.g. 512x1024") from None
    if h < 1 or w < 1:
        raise SegpromptError(f"--size '{text}': height and width must be positive")
    return h, w


def default_size(cfg: Recipe) -> tuple[int, int]:
    """(H, W): the paper's size for Cityscapes (512x1024) and CamVid (720x960), else the recipe's
    ``data.test.scale`` (MMSegmentation's (w, h) order)."""
    if cfg.data.dataset in DEFAULT_SIZES:
        return DEFAULT_SIZES[cfg.data.dataset]
    if cfg.data.test.scale is None:
        raise SegpromptError(f"the recipe sets no data.test.scale and dataset '{cfg.data.dataset}' has no "
                             f"default bench size; give --size HxW")
    w, h = cfg.data.test.scale
    return int(h), int(w)


# ---- the model ---------------------------------------------------------------------------------

class _ParameterUse(TorchFunctionMode):
    """Records which of the given parameters reach a torch function (a module's own forward or a
    functional use of a module's weight alike)."""

    def __init__(self, params: dict[int, nn.Parameter]):
        super().__init__()
        self.params = params
        self.used: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.params:
                self.used.add(id(leaf))
        return func(*args, **kwargs)


def inference_params(model: nn.Module, size: tuple[int, int]) -> int:
    """Parameters that ``model(img)`` in eval mode reads, for one ``size`` image: run on a copy on
    the ``meta`` device (no compute), or on the model itself if some module cannot run there."""
    def used(m: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
        params = {id(p): p for p in m.parameters()}
        was_training = m.training
        m.eval()
        try:
            with torch.no_grad(), _ParameterUse(params) as mode:
                m(torch.zeros(1, 3, *size, device=device, dtype=dtype))
        finally:
            m.train(was_training)
        return sum(params[i].numel() for i in mode.used)

    try:
        return used(copy.deepcopy(model).to("meta"), torch.device("meta"), torch.float32)
    except (NotImplementedError, RuntimeError):  # e.g. torch.autocast refuses the meta device
        p = next(model.parameters(), None)
        return used(model, p.device, p.dtype) if p is not None else 0


def model_costs(model: nn.Module, size: tuple[int, int], keys: tuple[str, ...] = COST_KEYS) -> dict[str, int]:
    """``params`` (every parameter), ``params_inference``, ``flops_mmcv`` and ``flops_torch`` at
    ``size`` = (H, W); only ``keys`` are computed."""
    fns: dict[str, Callable[[], int]] = {
        "params": lambda: sum(p.numel() for p in model.parameters()),
        "params_inference": lambda: inference_params(model, size),
        "flops_mmcv": lambda: mmcv_flops(model, size),
        "flops_torch": lambda: torch_flops(model, size),
    }
    unknown = [k for k in keys if k not in fns]
    if unknown:
        raise ValueError(f"unknown cost keys {unknown}; known: {list(fns)}")
    return {k: int(fns[k]()) for k in keys}


# ---- targets and output files ------------------------------------------------------------------

def check_out(out: Path | None, force: bool) -> None:
    """Refuse, before anything is measured, to overwrite an existing ``--out`` file without --force."""
    if out is not None and out.exists() and not force:
        raise SegpromptError(f"'{out}' already exists; choose another --out, or add --force to overwrite it")
    if out is not None and out.is_dir():
        raise SegpromptError(f"--out '{out}' is a folder; give a file name such as {out / BENCH_FILE}")


def save_run_bench(run_dir: Path, result: dict[str, Any]) -> Path:
    """Write ``RUN/bench.json`` (what ``segprompt ablate`` collects); an earlier one is moved to
    ``RUN/bench_history/`` first, never overwritten."""
    path = run_dir / BENCH_FILE
    refuse_live_run(path, "bench.json")  # a running run is read-only to other commands
    write_json_keeping_history(path, result, HISTORY_DIR)
    return path


# ---- timing ------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Timed:
    """One model ready to time: on the device, cast, optionally channels-last and compiled, with
    its input made once on the device."""

    def __init__(self, model: nn.Module, size: tuple[int, int], device: torch.device, opts: BenchOptions):
        fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
        dtype = DTYPES[opts.dtype]
        model = model.to(device=device, dtype=dtype, memory_format=fmt).eval()  # in place: counted already
        # batch 1 at a fixed size: the static shapes CUDA graphs (mode reduce-overhead) need
        self.model = torch.compile(model, mode=opts.compile_mode, dynamic=False) if opts.compile else model
        self.img = torch.randn(1, 3, *size, device=device, dtype=dtype).contiguous(memory_format=fmt)
        self.device = device
        self.chunk_iters = 0
        self.chunk_seconds: list[float] = []
        self.calibration: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, iters: int) -> float:
        """Seconds for ``iters`` forward passes, synchronised at both ends."""
        self.sync()
        start = time.perf_counter()
        for _ in range(iters):
            self.model(self.img)
        self.sync()
        return time.perf_counter() - start

    def calibrate(self, opts: BenchOptions) -> None:
        """Double the iterations from ``calib_iters`` until one pass takes >= ``calib_seconds``; the
        chunk length follows from that latency estimate."""
        n = opts.calib_iters
        while (dt := self.run(n)) < opts.calib_seconds:
            n *= 2
        self.calibration = {"iterations": n, "seconds": dt}
        self.chunk_iters = max(1, math.ceil(opts.seconds / opts.chunks / (dt / n)))

    def summary(self) -> dict[str, Any]:
        latencies = [1000 * s / self.chunk_iters for s in self.chunk_seconds]
        latency = 1000 * sum(self.chunk_seconds) / (self.chunk_iters * len(self.chunk_seconds))
        return {"fps": 1000 / latency, "latency_ms": latency,
                "latency_ms_std": statistics.stdev(latencies) if len(latencies) > 1 else 0.0,
                "latency_ms_chunks": latencies, "iterations": self.chunk_iters * len(self.chunk_seconds),
                "chunk_iterations": self.chunk_iters, "timed_seconds": sum(self.chunk_seconds),
                "calibration": self.calibration}


def time_models(models: list[nn.Module], size: tuple[int, int], opts: BenchOptions) -> list[dict[str, Any]]:
    """Warm up and calibrate each model, then time them in alternating chunks (A B A B ...)."""
    device = resolve_device(opts.device, key="--device")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the paper's PyTorch fallback
    with torch.inference_mode():
        timed = [_Timed(m, size, device, opts) for m in models]
        for t in timed:
            t.run(opts.warmup)
            t.calibrate(opts)
        for _ in range(opts.chunks):
            for t in timed:
                t.chunk_seconds.append(t.run(t.chunk_iters))
    return [t.summary() for t in timed]


def _model_entry(target: Path, cfg: Recipe, model: nn.Module, meta: DatasetMeta, names: str,
                 size: tuple[int, int]) -> dict[str, Any]:
    return {"recipe": str(target), "engine": "pytorch", "backbone": cfg.model.backbone["name"], "tuning": cfg.tuning["name"],
            "num_classes": meta.num_classes, "class_names": names, "text_deployed": int(model.text_deployed),
            **model_costs(model, size)}


def run_bench(target: str | Path, opts: BenchOptions, overrides: list[str] | None = None,
              vs: str | Path | None = None) -> dict[str, Any]:
    """Measure ``target`` (a recipe, a run directory, or an exported ``.onnx`` file on onnxruntime:
    :mod:`segprompt.measure.ort_bench`), alone or alternately with ``vs``. The result
    has every knob, the model's counts and timing at the top level (the keys ``segprompt ablate``
    reads: fps, latency_ms, params, params_inference, flops_mmcv, flops_torch), and with ``vs`` its
    entry under ``"vs"`` and ``fps_ratio`` = fps(target) / fps(vs)."""
    opts.check()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    overrides = list(overrides or [])
    device = resolve_device(opts.device, key="--device")
    provider = opts.provider or ("cuda" if device.type == "cuda" else "cpu")
    targets = [target] + ([vs] if vs is not None else [])
    # an ONNX file runs on onnxruntime (docs/deploy.md); a recipe or run directory is built in PyTorch
    sources = [OrtModel(t, provider, opts.threads) if is_onnx(t) else run_recipe(t, overrides) for t in targets]
    sizes = [s.default_size() if isinstance(s, OrtModel) else default_size(s[0]) for s in sources]
    size = opts.size or sizes[0]
    if size is None:
        raise SegpromptError(f"'{target}' has symbolic height and width and no record of its export size; "
                             f"give --size HxW")
    if vs is not None and opts.size is None and sizes[1] != size:
        raise SegpromptError(f"'{target}' and --vs '{vs}' default to different sizes ({size} and "
                             f"{sizes[1]}); give --size HxW to compare them at one size")
    entries, models = [], []
    for t, src in zip(targets, sources):
        if isinstance(src, OrtModel):
            src.check(size, opts.dtype, opts.channels_last, opts.compile, device)
            models.append(src)
            entries.append(src.entry())
            continue
        cfg, meta = src
        meta, names = (meta, "checkpoint") if meta is not None else bench_meta(cfg)
        model = bench_model(cfg, meta)
        models.append(model)
        entries.append(_model_entry(Path(t), cfg, model, meta, names, size))
    timings = time_models(models, size, opts)
    knobs = {k: v for k, v in asdict(opts).items() if k not in ("size", "device", "threads")}
    result = {
        "segprompt": __version__, "git_commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "size": list(size), "batch": 1, "device": str(device), "device_name": device_name(device),
        "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), **knobs,
        "cudnn_benchmark": device.type == "cuda", "weights": "random (no pretrained file read)",
        "output": "main logits resized to the input (the eval forward)",
        **entries[0], **timings[0],
    }
    if vs is not None:
        result["vs"] = {**entries[1], **timings[1]}
        result["fps_ratio"] = timings[0]["fps"] / timings[1]["fps"]
    return result


# fewer timed iterations than this make an FPS figure rough (one scheduler hiccup moves it by percents)
MIN_TIMED_ITERATIONS = 50


def comparison_lines(result: dict[str, Any]) -> list[str]:
    """The sentences printed under the table: which model is faster and by how much (``--vs``),
    and a warning for each model timed over fewer than :data:`MIN_TIMED_ITERATIONS` iterations."""
    models = [result] + ([result["vs"]] if "vs" in result else [])
    lines = []
    if "vs" in result:
        a, b = (f"{Path(m['recipe']).name} ({m['engine']})" for m in models)
        r = result["fps_ratio"]
        faster, slower = (a, b) if r >= 1 else (b, a)
        lines.append(f"fps ratio {a} / {b}: {r:.3f}, i.e. {faster} is {max(r, 1 / r):.2f}x faster than {slower}")
    for m in models:
        if m["iterations"] < MIN_TIMED_ITERATIONS:
            lines.append(f"warning: {Path(m['recipe']).name} was timed over only {m['iterations']} iterations "
                         f"(fewer than {MIN_TIMED_ITERATIONS}): its FPS is rough; give --seconds more time")
    return lines


def format_table(result: dict[str, Any]):
    """A rich table: one column per model (and the ratio with --vs)."""
    models = [result] + ([result["vs"]] if "vs" in result else [])
    h, w = result["size"]
    title = (f"bench {h}x{w}, batch 1, {result['dtype']}{', channels-last' if result['channels_last'] else ''}"
             f"{', compiled (' + result.get('compile_mode', 'default') + ')' if result['compile'] else ''} on {result['device_name']} ({result['device']}, "
             f"{result['threads']} threads, torch {result['torch']}"
             + "".join(f", onnxruntime {m['onnxruntime']} {m['provider']}" for m in models[:2] if "onnxruntime" in m)
             + ")")
    table = Table(title=title)
    table.add_column("")
    for m in models:
        table.add_column(Path(m["recipe"]).stem + (" (ORT)" if m.get("engine") == "onnxruntime" else ""),
                         justify="right")
    if "vs" in result:
        table.add_column(f"ratio ({Path(models[0]['recipe']).stem} / {Path(models[1]['recipe']).stem})",
                         justify="right")
    rows = [("FPS", "fps", "{:.1f}"), ("latency (ms)", "latency_ms", "{:.2f}"),
            ("± std (ms)", "latency_ms_std", "{:.2f}"), ("timed iterations", "iterations", "{:d}"),
            ("#Params (M)", "params", "M"), ("inference params (M)", "params_inference", "M"),
            ("FLOPs MMCV (G)", "flops_mmcv", "G"), ("FLOPs torch (G)", "flops_torch", "G")]
    for label, key, fmt in rows:
        values = [m[key] for m in models]
        shown = ["-" if v is None else f"{v / 1e6:.3f}" if fmt == "M" else f"{v / 1e9:.2f}" if fmt == "G"
                 else fmt.format(v) for v in values]  # None: not known (FLOPs of an ONNX file)
        if "vs" in result:
            shown.append(f"{values[0] / values[1]:.3f}" if key in ("fps", "latency_ms") and values[1] else "")
        table.add_row(label, *shown)
    return table
