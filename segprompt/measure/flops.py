"""FLOP counts of a segmentor's inference path, as papers report them (``docs/measurement.md``, "FLOPs").

* :func:`mmcv_flops` follows MMCV's ``get_model_complexity_info`` (``mmcv/cnn/utils/flops_counter.py``,
  run by MMSegmentation's ``tools/get_flops.py``), the counter behind the CLIP-distilled STDC-Seg
  paper's "GFLOPs": one multiply-add is one FLOP. Forward hooks count per module, matched by exact
  type as MMCV does (a subclass or ``SyncBatchNorm`` counts nothing):

  - Conv1d/2d/3d: MACs (k·k·Cin/groups·Cout per output position) + Cout per output position if biased;
    ConvTranspose2d: MACs over input positions (+ MMCV's bias term, which uses the output height twice);
  - BatchNorm/GroupNorm/InstanceNorm/LayerNorm: input numel, twice if affine;
  - ReLU/PReLU/ELU/LeakyReLU/ReLU6: output numel; pooling modules: input numel;
  - Linear: input numel x out_features (no bias term); Upsample: output numel of one sample;
  - nothing else: functional ops (interpolate, F.avg_pool2d, matmul/bmm, normalize, cat, add) and
    modules such as Sigmoid or Dropout count 0.

  It is written by hand because no maintained library reproduces these rules (fvcore, thop, ptflops
  and torch's counter each count BN, pooling, activations and functional ops differently).
* :func:`torch_flops` is ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per MAC of matmul/conv
  ops (functional ones included), nothing for normalisation, activations or pooling.

Both run the model as ``model(img)`` in eval mode on one image, i.e. MMSegmentation's
``forward_dummy`` (backbone + decode head; auxiliary heads only run with a label). They run on a
copy on the ``meta`` device (shapes only: well under a second even at full resolution) and fall
back to the model's own device (CPU for a model built on ``meta``) if some module cannot run there.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _conv(m: nn.Module, inputs: tuple, out: torch.Tensor) -> int:
    positions = out.shape[0] * math.prod(out.shape[2:])
    macs = math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups) * positions
    return macs + (m.out_channels * positions if m.bias is not None else 0)


def _deconv(m: nn.Module, inputs: tuple, out: torch.Tensor) -> int:
    x = inputs[0]
    macs = math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups) * x.shape[0] * math.prod(x.shape[2:])
    # MMCV's bias term multiplies the output height by itself (kept, to give MMCV's numbers)
    bias = m.out_channels * x.shape[0] * out.shape[2] * out.shape[2] if m.bias is not None else 0
    return macs + bias


def _norm(m: nn.Module, inputs: tuple, out: torch.Tensor) -> int:
    affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
    return inputs[0].numel() * (2 if affine else 1)


def _activation(m: nn.Module, inputs: tuple, out: torch.Tensor) -> int:
    return out.numel()


def _pool(m: nn.Module, inputs: tuple, out: torch.Tensor) -> int:
    return inputs[0].numel()


def _linear(m: nn.Module, inputs: tuple, out: torch.Tensor) -> int:
    return inputs[0].numel() * out.shape[-1]


def _upsample(m: nn.Module, inputs: tuple, out: torch.Tensor) -> int:
    return out[0].numel()


MMCV_RULES: dict[type, Callable[[nn.Module, tuple, torch.Tensor], int]] = {
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
    nn.ConvTranspose2d: _deconv,
    **dict.fromkeys((nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6), _activation),
    **dict.fromkeys((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                     nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                     nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), _pool),
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d,
                     nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm), _norm),
    nn.Linear: _linear,
    nn.Upsample: _upsample,
}


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(H, W) or (C, H, W) -> a batch of one image, as MMSegmentation's get_flops ``--shape``."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        shape = (3, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (H, W) or (C, H, W), got {input_shape!r}")
    return (1, *shape)


def _run(model: nn.Module, input_shape: tuple[int, ...], count: Callable[[nn.Module, torch.Tensor], int]) -> int:
    """``count(model, img)`` on a meta-device copy of the model in eval mode; if it cannot run on
    ``meta``, on the model itself (its own device; an uninitialised CPU copy of a meta model), its
    training mode restored afterwards."""
    shape = _image_shape(input_shape)
    on_meta = all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    try:
        meta_model = model if on_meta else copy.deepcopy(model).to("meta")
        was_training = meta_model.training
        meta_model.eval()
        try:
            with torch.no_grad():
                return count(meta_model, torch.zeros(shape, device="meta"))
        finally:
            meta_model.train(was_training)
    except (NotImplementedError, RuntimeError):
        pass
    if on_meta:  # no weights to run: an uninitialised CPU copy (the values do not matter for counting)
        model = copy.deepcopy(model).to_empty(device="cpu")
    param = next(iter(model.parameters()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count(model, torch.zeros(shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)


def _count_mmcv(model: nn.Module, img: torch.Tensor) -> int:
    total = [0]
    handles = []
    for m in model.modules():
        rule = MMCV_RULES.get(type(m))
        if rule is not None:
            def hook(mod, inputs, out, rule=rule):
                total[0] += int(rule(mod, inputs, out))
            handles.append(m.register_forward_hook(hook))
    try:
        model(img)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _count_torch(model: nn.Module, img: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(img)
    return int(counter.get_total_flops())


def mmcv_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (multiply-adds) of ``model(img)`` for one image of ``input_shape`` ((H, W) or (C, H, W)),
    counted by MMCV's ``get_model_complexity_info`` rules (module docstring). STDC1-Seg at K=19:
    16.95e9 at 512x1024, 22.42e9 at 720x960."""
    return _run(model, input_shape, _count_mmcv)


def torch_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of ``model(img)`` for one image as ``torch.utils.flop_counter.FlopCounterMode`` counts
    them (2 per multiply-add of matmul/conv ops)."""
    return _run(model, input_shape, _count_torch)
