"""`segprompt bench FILE.onnx`: an exported ONNX file timed with onnxruntime under the same
protocol as a PyTorch model (``docs/deploy.md``, "Timing an ONNX file"; ``docs/measurement.md``,
"Speed").

:class:`OrtModel` is an ``nn.Module`` without parameters whose call runs the file's
``InferenceSession`` once, so :mod:`segprompt.measure.bench` warms it up, calibrates and times it in
alternating chunks exactly as it times a PyTorch model, and ``--vs`` compares the two. The input the
bench makes once on the device is bound to the session once (onnxruntime's I/O binding of that
tensor's memory, no copy), and the output stays on the device, so the loop holds one
``run_with_iobinding`` and nothing else.

The provider follows ``--device`` (CPUExecutionProvider, CUDAExecutionProvider) unless
``--provider`` names one (``tensorrt``: TensorrtExecutionProvider, with the onnxruntime-gpu build).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segprompt.errors import SegpromptError
from segprompt.serve.export import INPUT, OUTPUT, ort_session, require, sidecar

# onnxruntime's input type -> (the bench's --dtype, the torch dtype of the input)
INPUT_TYPES = {"tensor(float)": ("fp32", torch.float32), "tensor(float16)": ("fp16", torch.float16)}
ELEMENT = {torch.float32: np.float32, torch.float16: np.float16}


def is_onnx(target: str | Path | None) -> bool:
    return target is not None and Path(target).suffix == ".onnx"


class OrtModel(nn.Module):
    """The ONNX file ``path`` on onnxruntime's ``provider`` (cpu | cuda | tensorrt) with ``threads``
    intra-op threads (None: onnxruntime's default); ``model(img)`` runs it once on ``img``."""

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None):
        super().__init__()
        require("onnxruntime", "segprompt bench FILE.onnx")
        self.path = Path(path)
        if not self.path.is_file():
            raise SegpromptError(f"ONNX file '{self.path}' does not exist; write one with `segprompt export ... "
                                 f"--out {self.path}`")
        self.provider = provider
        self.threads = threads
        try:
            self.session = ort_session(self.path, provider, threads)
        except SegpromptError:  # no such provider here
            raise
        except Exception as e:  # not an ONNX file, or one this onnxruntime cannot load
            raise SegpromptError(f"onnxruntime cannot load '{self.path}' ({' '.join(str(e).split())[:200]}); "
                                 f"export it again with `segprompt export`") from None
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [INPUT] or OUTPUT not in [o.name for o in self.session.get_outputs()]:
            raise SegpromptError(f"'{self.path}' takes {[i.name for i in inputs]} and gives "
                                 f"{[o.name for o in self.session.get_outputs()]}; bench times files written by "
                                 f"`segprompt export` ('{INPUT}' -> '{OUTPUT}')")
        self.input_shape = list(inputs[0].shape)
        if inputs[0].type not in INPUT_TYPES:
            raise SegpromptError(f"'{self.path}' takes {inputs[0].type} input; bench feeds float32 or float16")
        self.dtype_name, self.dtype = INPUT_TYPES[inputs[0].type]
        record = sidecar(self.path)
        self.record: dict[str, Any] = json.loads(record.read_text()) if record.is_file() else {}
        self._bound: tuple[torch.Tensor, Any] | None = None

    def default_size(self) -> tuple[int, int] | None:
        """(H, W) of a static input, else the export size its record names, else None."""
        h, w = self.input_shape[2:]
        if isinstance(h, int) and isinstance(w, int):
            return h, w
        size = self.record.get("size")
        return (int(size[0]), int(size[1])) if size else None

    def check(self, size: tuple[int, int], dtype: str, channels_last: bool, compile_: bool,
              device: torch.device) -> None:
        """Refuse what this file cannot be timed with, before any timing."""
        if dtype != self.dtype_name:
            raise SegpromptError(f"'{self.path}' takes {self.dtype_name} input (exported with --dtype "
                                 f"{self.dtype_name}); bench it with --dtype {self.dtype_name}")
        if channels_last or compile_:
            raise SegpromptError(f"--channels-last and --compile are PyTorch settings; '{self.path}' runs on "
                                 f"onnxruntime, which lays out and compiles its graph itself")
        if (device.type == "cuda") != (self.provider in ("cuda", "tensorrt")):
            raise SegpromptError(f"onnxruntime provider '{self.provider}' does not run on device '{device}'; use "
                                 f"--device cuda with --provider cuda|tensorrt, --device cpu with cpu")
        fixed = self.input_shape[2:]
        if all(isinstance(d, int) for d in fixed) and tuple(fixed) != tuple(size):
            raise SegpromptError(f"'{self.path}' has a fixed {fixed[0]}x{fixed[1]} input; bench it at that "
                                 f"size (drop --size) or export it with --dynamic or --size {size[0]}x{size[1]}")

    def _binding(self, img: torch.Tensor):
        """The session's I/O binding of ``img``'s memory (made once per input tensor)."""
        if self._bound is None or self._bound[0] is not img:
            if not img.is_contiguous() or img.dtype != self.dtype:
                raise ValueError(f"{self.path} takes a contiguous {self.dtype} NCHW tensor, got {img.dtype}")
            binding = self.session.io_binding()
            kind = "cuda" if img.device.type == "cuda" else "cpu"
            binding.bind_input(INPUT, kind, img.device.index or 0, ELEMENT[img.dtype], tuple(img.shape),
                               img.data_ptr())
            binding.bind_output(OUTPUT, kind, img.device.index or 0)
            self._bound = (img, binding)
        return self._bound[1]

    def forward(self, img: torch.Tensor):
        """Run the file once on ``img``; returns onnxruntime's output values (left on the device)."""
        binding = self._binding(img)
        self.session.run_with_iobinding(binding)
        if img.device.type == "cuda":
            binding.synchronize_outputs()
        return binding.get_outputs()

    def predict(self, img: torch.Tensor) -> torch.Tensor:
        """The logits for ``img`` as a CPU tensor (copied out; not what the bench times)."""
        self.forward(img)
        return torch.from_numpy(self._bound[1].copy_outputs_to_cpu()[0])

    def entry(self) -> dict[str, Any]:
        """The model's part of a bench result: the file, its record's facts, its weight count."""
        onnx = require("onnx", "segprompt bench FILE.onnx")
        proto = onnx.load(str(self.path), load_external_data=False)
        weights = sum(int(torch.Size(t.dims).numel()) for t in proto.graph.initializer)
        ort = require("onnxruntime", "segprompt bench FILE.onnx")
        r = self.record
        return {"recipe": str(self.path), "engine": "onnxruntime", "onnxruntime": ort.__version__,
                "provider": self.session.get_providers()[0], "ort_threads": self.threads,
                "backbone": r.get("backbone"), "tuning": r.get("tuning"), "num_classes": r.get("num_classes"),
                "class_names": r.get("class_names"), "text_deployed": r.get("text_deployed"),
                "weights": f"the file's ({r.get('weights', 'unknown')} when exported)",
                "params": weights, "params_inference": weights, "flops_mmcv": None, "flops_torch": None}
