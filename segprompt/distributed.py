"""Process-group setup under `torchrun` and the few collectives training and evaluation need.

One code path for every launch: a plain ``segprompt train`` is world size 1 with no process
group; under ``torchrun`` (one node or ``--nnodes`` many) the environment variables it sets
select NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segprompt.errors import SegpromptError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, key: str = "runtime.device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` (this process's local rank) | ``cuda:<i>``; ``key`` names the
    setting in the error a missing device raises."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if name == "cpu":
        return torch.device("cpu")
    if kind != "cuda" or (index and not index.isdigit()):
        raise SegpromptError(f"{key} '{name}' is not one of: auto, cpu, cuda, cuda:<index>")
    if not torch.cuda.is_available():
        use = f"--set {key}=cpu" if "." in key else f"{key} cpu"
        raise SegpromptError(f"{key} is '{name}' but no CUDA device is visible; use {use} (or auto)")
    i = int(index) if index else local_rank
    if i >= torch.cuda.device_count():
        raise SegpromptError(f"{key} '{name}': there are {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", i)


def init_distributed(device_name: str) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Gather an object from every rank. It travels as ``torch.save`` bytes and is read back with
    ``weights_only`` loading (``all_gather_object`` failed to unpickle tensors under torch 2.13)."""
    if not dist.is_initialized():
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over ranks (every rank must call it)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum that every rank uses is again the sum over ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """Batch statistics over all processes for CPU (gloo) runs.

    Written here because torch's ``nn.SyncBatchNorm`` refuses CPU tensors. The sums go through
    an autograd-aware all-reduce, so gradients flow through the global statistics exactly as in
    a single process that sees the whole batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        dims = [0, 2, 3]
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), (x * x).sum(dims), n_local]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device, frozen: Callable[[nn.Module], bool]) -> nn.Module:
    """Swap trainable BatchNorm layers for synchronised ones (the caller does so only when the
    world size is > 1). Subtrees ``frozen`` says are kept in eval mode (the training loop passes
    :func:`segprompt.models.frozen.kept_in_eval`) keep their fixed statistics and plain BN."""
    if frozen(model):
        return model
    if isinstance(model, nn.BatchNorm2d):
        if device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        new = CPUSyncBatchNorm(model.num_features, model.eps, model.momentum, model.affine,
                               model.track_running_stats)
        new.load_state_dict(model.state_dict())
        if model.affine:
            new.weight.requires_grad_(model.weight.requires_grad)
            new.bias.requires_grad_(model.bias.requires_grad)
        return new.train(model.training)
    for name, child in model.named_children():
        model.add_module(name, convert_sync_batchnorm(child, device, frozen))
    return model
