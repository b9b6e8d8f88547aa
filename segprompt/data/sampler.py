"""Resumable, rank-sharded sampling for iteration-based training, and sharding for evaluation.

Training reads one infinite stream of dataset indices: the concatenation of per-epoch
permutations, each seeded by ``(seed, epoch)``. Global step ``t`` consumes stream positions
``[t*G, (t+1)*G)`` (``G`` = global batch); within it, micro-step ``k`` of rank ``r`` takes the
contiguous slice starting at ``t*G + k*world*micro + r*micro``. Each sample also carries an
augmentation seed derived from ``(seed, position)``. Hence:

* the same global batch sees the same samples with the same augmentation whatever the world
  size, accumulation or number of workers (a 2-process run matches a 1-process run);
* resuming at step ``t`` needs nothing but ``t``: the data order continues exactly;
* a dataset smaller than the batch (one-shot protocols) simply repeats.

torch's ``DistributedSampler`` is not used: it cannot start mid-epoch, and at evaluation it pads
shards with duplicated samples, which would count some images twice in the metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def sample_seed(seed: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, position]).generate_state(1, np.uint64)[0])


class TrainBatchSampler:
    """Yields this rank's micro-batches as lists of ``(dataset index, augmentation seed)``."""

    def __init__(self, dataset_len: int, micro_batch: int, *, world_size: int = 1, rank: int = 0,
                 accum_steps: int = 1, seed: int = 0, start_step: int = 0):
        if dataset_len < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n = dataset_len
        self.micro = micro_batch
        self.world = world_size
        self.rank = rank
        self.accum = accum_steps
        self.seed = seed
        self.start_step = start_step

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def _take(self, start: int) -> list[tuple[int, int]]:
        out = []
        for pos in range(start, start + self.micro):
            epoch, offset = divmod(pos, self.n)
            if epoch != self._cached_epoch:
                self._cached_epoch, self._perm = epoch, self._epoch(epoch)
            out.append((int(self._perm[offset]), sample_seed(self.seed, pos)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self._cached_epoch, self._perm = -1, None
        step = self.start_step
        while True:
            base = step * self.global_batch
            for k in range(self.accum):
                yield self._take(base + (k * self.world + self.rank) * self.micro)
            step += 1


def eval_shard(dataset_len: int, world_size: int = 1, rank: int = 0) -> list[int]:
    """Every index exactly once across ranks: no padding, no drop (shards may differ by one)."""
    return list(range(rank, dataset_len, world_size))
