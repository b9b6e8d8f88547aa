"""Optimizers with name-pattern parameter groups, and poly LR with linear warm-up.

Parameter groups follow MMSegmentation's ``paramwise_cfg.custom_keys``: each group is a regular
expression searched in the parameter's name with an lr and a weight-decay multiplier; the first
pattern that matches wins, the rest use the base values. Frozen parameters never reach the
optimizer, so they carry no optimizer state.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from segprompt.config import OptimizerConfig, ScheduleConfig
from segprompt.errors import SegpromptError


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    patterns = [(re.compile(g.pattern), g) for g in cfg.param_groups]
    groups: dict[int, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key, lr_mult, decay_mult = -1, 1.0, 1.0
        for i, (rx, g) in enumerate(patterns):
            if rx.search(name):
                key, lr_mult, decay_mult = i, g.lr_mult, g.decay_mult
                break
        group = groups.setdefault(key, {"params": [], "names": [], "lr": cfg.lr * lr_mult,
                                        "weight_decay": cfg.weight_decay * decay_mult,
                                        "pattern": None if key < 0 else cfg.param_groups[key].pattern})
        group["params"].append(p)
        group["names"].append(name)
    if not groups:
        raise SegpromptError("the tuning method left no trainable parameter; check `tuning`")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for g in groups:
        g.pop("names")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def poly_factor(it: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """lr(it) / base_lr: ``(base - min) * (1 - it/T)^p + min``, times MMSegmentation's linear
    warm-up factor ``1 - (1 - it/W) * (1 - warmup_ratio)`` during the first W iterations."""
    t = min(it, cfg.iters) / max(cfg.iters, 1)
    min_lr = min(cfg.min_lr, base_lr)
    lr = (base_lr - min_lr) * (1 - t) ** cfg.power + min_lr
    if it < cfg.warmup_iters:
        lr *= 1 - (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr / base_lr if base_lr > 0 else 0.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    lambdas = [lambda it, b=g["lr"]: poly_factor(it, b, cfg) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
