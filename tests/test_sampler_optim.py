"""The resumable sampler's guarantees and the optimizer/schedule construction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from segprompt.config import OptimizerConfig, ParamGroupConfig, ScheduleConfig
from segprompt.data.sampler import TrainBatchSampler, eval_shard
from segprompt.training.optim import build_optimizer, build_scheduler, poly_factor


def _global_batches(n, G, world, accum, steps, start=0, seed=3):
    micro = G // (world * accum)
    streams = [iter(TrainBatchSampler(n, micro, world_size=world, rank=r, accum_steps=accum, seed=seed,
                                      start_step=start)) for r in range(world)]
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(accum):
            for s in streams:
                batch += next(s)
        out.append(sorted(batch))
    return out


@pytest.mark.parametrize("world,accum", [(2, 1), (4, 1), (2, 2), (1, 4)])
def test_global_batch_independent_of_world_size_and_accumulation(world, accum):
    ref = _global_batches(10, 8, 1, 1, 6)
    assert _global_batches(10, 8, world, accum, 6) == ref


def test_resume_continues_the_same_stream():
    full = _global_batches(7, 4, 2, 1, 9)
    assert _global_batches(7, 4, 2, 1, 4, start=5) == full[5:]


def test_epochs_are_permutations_and_small_datasets_repeat():
    s = iter(TrainBatchSampler(5, 5, seed=1))
    e0, e1 = [i for i, _ in next(s)], [i for i, _ in next(s)]
    assert sorted(e0) == sorted(e1) == list(range(5)) and e0 != e1
    one_shot = list(itertools.islice(iter(TrainBatchSampler(1, 4)), 3))
    assert all(i == 0 for b in one_shot for i, _ in b)
    seeds = [sd for b in one_shot for _, sd in b]
    assert len(set(seeds)) == len(seeds)  # each repetition is augmented differently


def test_eval_shards_cover_every_sample_once():
    for n, world in [(7, 2), (5, 3), (2, 4)]:
        shards = [eval_shard(n, world, r) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_by_pattern_and_frozen_excluded():
    net = _Net()
    cfg = OptimizerConfig(lr=0.1, weight_decay=1e-2, param_groups=[
        ParamGroupConfig(pattern=r"\.bias$", decay_mult=0.0), ParamGroupConfig(pattern="^head", lr_mult=10)])
    opt = build_optimizer(net, cfg)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(net.backbone.bias)]["weight_decay"] == 0.0  # first matching pattern wins
    assert by_param[id(net.head.bias)]["lr"] == pytest.approx(0.1)
    assert by_param[id(net.head.weight)]["lr"] == pytest.approx(1.0)
    assert by_param[id(net.backbone.weight)]["lr"] == pytest.approx(0.1)
    assert by_param[id(net.backbone.weight)]["weight_decay"] == pytest.approx(1e-2)
    assert id(net.frozen.weight) not in by_param and id(net.frozen.bias) not in by_param


def test_poly_schedule_with_linear_warmup_matches_formula():
    cfg = ScheduleConfig(iters=100, warmup_iters=10, warmup_ratio=1e-6, power=0.9, min_lr=1e-4)
    net = _Net()
    opt = build_optimizer(net, OptimizerConfig(lr=0.01, param_groups=[ParamGroupConfig(pattern="head", lr_mult=10)]))
    sched = build_scheduler(opt, cfg)
    seen = []
    for it in range(100):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for it in (0, 5, 10, 50, 99):
        for base, lr in zip((0.01, 0.1), seen[it]):
            poly = (base - 1e-4) * (1 - it / 100) ** 0.9 + 1e-4
            warm = 1 - (1 - it / 10) * (1 - 1e-6) if it < 10 else 1.0
            assert lr == pytest.approx(poly * warm, rel=1e-9)
    assert seen[0][0] == pytest.approx(0.01 * 1e-6, rel=1e-3)
    assert poly_factor(100, 0.01, cfg) * 0.01 == pytest.approx(1e-4)
    assert math.isclose(poly_factor(0, 0.01, ScheduleConfig(iters=10)), 1.0)


def test_adamw_betas():
    opt = build_optimizer(_Net(), OptimizerConfig(name="adamw", lr=1e-3, betas=(0.8, 0.9), weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["weight_decay"] == 0.05
