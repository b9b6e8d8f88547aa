"""`segprompt export`: the deployed inference model as one ONNX or TorchScript file, verified
against PyTorch (``docs/deploy.md``).

* **What is exported** (:class:`InferenceGraph`): ``image -> logits``, the whole-image eval forward
  of the deployed model (:mod:`segprompt.serve.deployed`): backbone, inserted tuning modules, decode
  head, the logits resized to the input. LoRA deltas are merged into their layers first with peft's
  own ``merge`` (:func:`merge_lora`), so a LoRA model exports as the plain network; text-guided
  models carry their K x 1024 embeddings as a constant, no text encoder. Normalisation, sliding
  windows, test-time augmentation and the resize to a label's size stay in Python.
* **ONNX** through ``torch.onnx.export(dynamo=True)`` (it needs onnxscript), checked with
  ``onnx.checker.check_model(full_check=True)``; **TorchScript** through ``torch.jit.trace``.
* **Verification** (:func:`parity`): the file's bytes are loaded back (onnxruntime's CPU provider,
  or ``torch.jit.load``) and run on a fixed-seed N(0, 1) sample input; the max absolute logit
  difference against the PyTorch model at the same dtype and the argmax agreement must be within
  :data:`TOLERANCE`. With ``--dynamic`` a second input of another batch and size is checked too.
* **Beside the file**: ``FILE.json`` (:func:`sidecar`) records the opset, shapes, dtype, sizes,
  classes, normalisation, provenance and the parity numbers. Both files are written atomically and
  an existing one is never replaced without ``--force``.

onnx, onnxruntime and onnxscript are the optional ``deploy`` extra (:func:`require`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segprompt import __version__
from segprompt.config import Recipe
from segprompt.errors import SegpromptError
from segprompt.io import (
    atomic_write_bytes,
    atomic_write_json,
    refuse_inputs_as_outputs,
    sha256_file,
)
from segprompt.runs.rundir import git_commit
from segprompt.runs.runlock import refuse_live_run
from segprompt.serve.deployed import Deployed, load_deployed

FORMATS = ("onnx", "torchscript")  # graphs; "delta" and "checkpoint" (serve/share.py) are trained tensors
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
INPUT, OUTPUT = "image", "logits"
# dtype -> (largest max |ORT - PyTorch| as a share of max(1, max |logit|), least argmax agreement)
TOLERANCE = {"fp32": (1e-3, 0.999), "fp16": (2e-2, 0.99)}
# onnxruntime's names for `--provider`; tensorrt and cuda need the onnxruntime-gpu build (docs/deploy.md)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
DEPLOY_EXTRA = "pip install 'segprompt[deploy]' (onnx, onnxruntime, onnxscript)"
IN_GRAPH = ("backbone, inserted tuning modules (SPM chain with its stored M0, adapters, prompts), decode head, "
            "logits resized to the input; LoRA merged into its layers; text embeddings as a constant")
FP16_NOTE = ("fp16 runs on onnxruntime's CPU provider, but several times slower than fp32 there (its CPU kernels "
             "are fp32); fp16 is meant for the CUDA and TensorRT providers (docs/deploy.md)")
NOT_IN_GRAPH = ("input normalisation ((pixel - mean) / std), sliding-window inference, test-time augmentation, "
                "the resize to the label's size, auxiliary and detail heads (training only)")


def require(module: str, what: str) -> Any:
    """Import ``module`` of the optional deploy extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SegpromptError(f"{what} needs the '{module}' package, which is not installed; {DEPLOY_EXTRA}") from None


def sidecar(path: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the record written beside an exported file."""
    return path.with_name(path.name + ".json")


@dataclass
class ExportOptions:
    format: str = "onnx"
    size: tuple[int, int] | None = None  # (H, W); None = the recipe's data.test.scale
    dynamic: bool = False  # batch, height and width as symbolic dimensions
    dtype: str = "fp32"
    checkpoint: str | None = None  # run directory: auto | best | last | deployed | PATH; recipe: PATH or none
    force: bool = False

    def check(self, out: Path) -> None:
        """Refuse bad options and an existing file, before anything is built."""
        if self.format not in FORMATS:
            raise SegpromptError(f"--format '{self.format}' is not one of: {', '.join(FORMATS)}")
        if self.dtype not in DTYPES:
            raise SegpromptError(f"--dtype '{self.dtype}' is not one of: {', '.join(DTYPES)}")
        if self.format == "onnx" and out.suffix != ".onnx":
            raise SegpromptError(f"--out '{out}': an ONNX file must end in .onnx (segprompt bench recognises it by "
                                 f"that), e.g. {out.with_suffix('.onnx')}")
        for path in (out, sidecar(out)):
            if path.is_dir():
                raise SegpromptError(f"--out '{out}': '{path}' is a folder; give a file name")
            if path.exists() and not self.force:
                raise SegpromptError(f"'{path}' already exists; choose another --out, or add --force to replace "
                                     f"'{out}' and its record '{sidecar(out).name}'")
        if self.format == "onnx":
            for module in ("onnx", "onnxruntime", "onnxscript"):
                require(module, "segprompt export --format onnx")


class InferenceGraph(nn.Module):
    """The exported graph: ``image (B, 3, H, W) -> logits (B, K, H, W)``, the deployed model's
    whole-image eval forward (the whole image as its view, so an SPM gets its stored M0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def merge_lora(model: nn.Module) -> int:
    """Merge every peft LoRA layer into its base layer (peft's ``merge``) and put the base layer back
    in its place, so the network is the plain one with W + scale * B A; returns how many."""
    if not any(type(m).__module__.startswith("peft.") for m in model.modules()):
        return 0  # no peft layer: skip importing peft (it pulls in transformers, seconds to import)
    from peft.tuners.tuners_utils import BaseTunerLayer
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:
        layer.merge(safe_merge=True)  # safe_merge: refuses a delta that makes the weights non-finite
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    return len(wrapped)


def export_size(cfg: Recipe, size: tuple[int, int] | None) -> tuple[int, int]:
    """(H, W): ``--size``, else the recipe's ``data.test.scale`` (MMSegmentation's (w, h) order)."""
    if size is not None:
        return size
    if cfg.data.test.scale is None:
        raise SegpromptError("the recipe sets no data.test.scale, so the export size is unknown; give --size HxW")
    w, h = cfg.data.test.scale
    return int(h), int(w)


def sample_inputs(size: tuple[int, int], dtype: torch.dtype, dynamic: bool) -> list[torch.Tensor]:
    """Fixed-seed N(0, 1) inputs (a normalised image's range): one at ``size``; with ``dynamic`` also
    a batch of 2 at another size (what a static graph could not take)."""
    gen = torch.Generator().manual_seed(0)
    h, w = size
    shapes = [(1, 3, h, w)] + ([(2, 3, h + 32, w + 64)] if dynamic else [])
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _quiet_jit() -> contextlib.AbstractContextManager:
    """torch.jit's trace/save/load warn that TorchScript is deprecated (docs/deploy.md says so once)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=Warning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    return stack


def export_onnx(graph: nn.Module, example: torch.Tensor, dynamic: bool) -> tuple[bytes, dict[str, Any]]:
    """The ONNX bytes of ``graph`` (checked with onnx.checker) and facts about the graph."""
    onnx = require("onnx", "segprompt export --format onnx")
    require("onnxscript", "torch.onnx.export (dynamo)")
    shapes = None
    if dynamic:
        dim = torch.export.Dim
        shapes = {INPUT: {0: dim("batch", min=1, max=256), 2: dim("height", min=32, max=8192),
                          3: dim("width", min=32, max=8192)}}
    try:
        with warnings.catch_warnings():
            # SPM's stage hook hands the interim map to the next stage through an attribute, and each SPM
            # keeps its last prompt ratio for the training log (segprompt/tuning/spm.py): scratch values of
            # one forward, not state, which torch.export reports as "assigned during export"; the parity
            # check below runs the written graph, so the warning only alarms
            warnings.filterwarnings("ignore", message=r"The tensor attributes .* were assigned during export")
            program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=shapes, external_data=False, verbose=False)
    except Exception as e:  # an operator or control flow the exporter cannot take: say so in one line
        first = " ".join(str(e).split())[:300]
        raise SegpromptError(f"torch.onnx.export could not export this model ({type(e).__name__}: {first}); "
                             f"try --format torchscript, or without --dynamic") from None
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    blob = proto.SerializeToString()

    def dims(value) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    facts = {"opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
             "input_shape": dims(proto.graph.input[0]), "output_shape": dims(proto.graph.output[0]),
             "weights_in_file": int(sum(np.prod(t.dims, dtype=np.int64) for t in proto.graph.initializer)),
             "onnx": onnx.__version__}
    return blob, facts


def export_torchscript(graph: nn.Module, example: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
    """The TorchScript bytes of ``graph`` traced on ``example``."""
    with _quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(graph, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    shape = list(example.shape)
    return buf.getvalue(), {"input_shape": shape, "output_shape": None}


def ort_session(model: bytes | str | Path, provider: str = "cpu", threads: int | None = None):
    """An onnxruntime session on ``provider`` (cpu | cuda | tensorrt), all graph optimisations on;
    ``threads`` sets the intra-op threads (None: onnxruntime's default, one per physical core)."""
    ort = require("onnxruntime", "running an ONNX file")
    name = PROVIDERS.get(provider)
    if name is None:
        raise SegpromptError(f"onnxruntime provider '{provider}' is not one of: {', '.join(PROVIDERS)}")
    if name not in ort.get_available_providers():
        raise SegpromptError(f"onnxruntime {ort.__version__} here has no {name} (it has "
                             f"{', '.join(ort.get_available_providers())}); the GPU providers come with the "
                             f"onnxruntime-gpu build and the CUDA/TensorRT libraries (docs/deploy.md)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
    providers = [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=opts,
                                providers=providers)


def run_exported(fmt: str, blob: bytes, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """The logits the file's bytes give for each input (onnxruntime CPU, or torch.jit.load)."""
    if fmt == "onnx":
        session = ort_session(blob)
        return [session.run([OUTPUT], {INPUT: x.numpy()})[0] for x in inputs]
    with _quiet_jit(), torch.no_grad():
        loaded = torch.jit.load(io.BytesIO(blob), map_location="cpu")
        return [loaded(x).numpy() for x in inputs]


def parity(reference: np.ndarray, got: np.ndarray, dtype: str) -> dict[str, Any]:
    """Max |got - reference|, the argmax agreement over pixels, and whether both are within
    :data:`TOLERANCE` for ``dtype``."""
    ref, out = reference.astype(np.float32), got.astype(np.float32)
    if ref.shape != out.shape:
        return {"shape": list(ref.shape), "got_shape": list(out.shape), "ok": False}
    rel, agree_min = TOLERANCE[dtype]
    scale = float(np.abs(ref).max())
    diff = float(np.abs(out - ref).max())
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    return {"shape": list(ref.shape), "max_abs_diff": diff, "max_abs_logit": scale, "argmax_agreement": agree,
            "tolerance": {"max_abs_diff": rel * max(1.0, scale), "argmax_agreement": agree_min},
            "ok": bool(np.isfinite(diff) and diff <= rel * max(1.0, scale) and agree >= agree_min)}


def _record(dep: Deployed, opts: ExportOptions, out: Path, size: tuple[int, int], facts: dict[str, Any],
            checks: list[dict[str, Any]], merged: int, seconds: float) -> dict[str, Any]:
    cfg = dep.cfg
    ort = importlib.import_module("onnxruntime") if opts.format == "onnx" else None
    return {
        "segprompt": __version__, "git_commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "file": out.name, "format": opts.format, "file_bytes": out.stat().st_size, "sha256": sha256_file(out),
        "dtype": opts.dtype, "dynamic": opts.dynamic, "size": list(size), **facts,
        "input": {"name": INPUT, "layout": "NCHW, RGB, (pixel - mean) / std with pixels in 0..255",
                  "mean": list(cfg.data.mean), "std": list(cfg.data.std)},
        "output": {"name": OUTPUT, "what": "class logits at the input's resolution; argmax over dim 1 = class id"},
        "in_graph": IN_GRAPH, "not_in_graph": NOT_IN_GRAPH,
        "backbone": cfg.model.backbone["name"], "tuning": cfg.tuning["name"], "lora_merged": merged,
        "text_deployed": int(getattr(dep.model, "text_deployed", 0)), "num_classes": dep.meta.num_classes,
        "class_names": dep.class_names, "classes": list(dep.meta.classes), "palette": dep.meta.palette,
        "align_corners": cfg.model.align_corners, **dep.source,
        "torch": torch.__version__, "onnxruntime": ort.__version__ if ort else None,
        "parity": {"reference": f"PyTorch eager, {opts.dtype}, CPU",
                   "runtime": "onnxruntime CPUExecutionProvider" if ort else "torch.jit.load",
                   "input": "N(0, 1), seed 0", "checks": checks},
        "verified": all(c["ok"] for c in checks), "export_seconds": seconds,
        **({"note": FP16_NOTE} if opts.dtype == "fp16" and opts.format == "onnx" else {}),
    }


def export_model(target: str | Path, out: str | Path, opts: ExportOptions,
                 overrides: list[str] = (), weights: str | Path | None = None) -> dict[str, Any]:
    """Export ``target`` (a run directory, a recipe with ``opts.checkpoint``, or a recipe alone:
    random weights) to ``out``, verify it, and write the record ``out.json``. Returns the record;
    a file that fails verification is kept (with ``verified: false``) and reported as an error."""
    out = Path(out)
    opts.check(out)
    refuse_live_run(out, "--out")
    start = time.perf_counter()
    dep = load_deployed(target, opts.checkpoint, list(overrides), weights=weights)
    read = [p for p in (dep.source.get("checkpoint"), dep.cfg.model.pretrained, weights, target) if p]
    refuse_inputs_as_outputs([out, sidecar(out)], [Path(p) for p in read if Path(p).is_file()])
    merged = merge_lora(dep.model)
    size = export_size(dep.cfg, opts.size)
    dtype = DTYPES[opts.dtype]
    graph = InferenceGraph(dep.model).to(dtype).eval()
    inputs = sample_inputs(size, dtype, opts.dynamic)
    with torch.no_grad():
        references = [graph(x).float().numpy() for x in inputs]
    if opts.format == "onnx":
        blob, facts = export_onnx(graph, inputs[0], opts.dynamic)
    else:
        blob, facts = export_torchscript(graph, inputs[0])
    facts["output_shape"] = facts["output_shape"] or list(references[0].shape)
    checks = [parity(ref, got, opts.dtype) for ref, got in zip(references, run_exported(opts.format, blob, inputs))]
    atomic_write_bytes(out, blob)
    record = _record(dep, opts, out, size, facts, checks, merged, time.perf_counter() - start)
    atomic_write_json(sidecar(out), record)
    if not record["verified"]:
        bad = next(c for c in checks if not c["ok"])
        raise SegpromptError(f"wrote '{out}', but it does not reproduce PyTorch on a {bad['shape']} input: "
                             f"{ {k: v for k, v in bad.items() if k not in ('ok', 'shape')} }; do not deploy it "
                             f"(record: '{sidecar(out)}')")
    return record


def summary_lines(record: dict[str, Any]) -> list[str]:
    """What ``segprompt export`` prints: the file's facts, one line per parity check, the fp16 note."""
    opset = f"opset {record['opset']}, " if "opset" in record else ""
    lines = [f"{record['format']} {opset}{record['dtype']}, input {record['input_shape']} -> output "
             f"{record['output_shape']}, {record['file_bytes'] / 1e6:.1f} MB; " + _weights(record)
             + (f", {record['lora_merged']} LoRA layers merged" if record["lora_merged"] else "")
             + (", text embeddings baked in" if record["text_deployed"] else "")]
    for c in record["parity"]["checks"]:
        lines.append(f"{record['parity']['runtime']} vs PyTorch on {c['shape']}: max |diff| {c['max_abs_diff']:.2e} "
                     f"(max |logit| {c['max_abs_logit']:.3g}), argmax agreement {100 * c['argmax_agreement']:.3f} %")
    if "note" in record:
        lines.append(f"note: {record['note']}")
    return lines


def _weights(record: dict[str, Any]) -> str:
    if record.get("checkpoint"):
        it = f" (iteration {record['iteration']})" if record.get("iteration") is not None else ""
        return f"weights of {record['checkpoint']}{it}"
    return f"weights: {record['weights']}"
