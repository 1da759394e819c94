"""DistributedSampler: which samples each rank takes, epoch by epoch, by
PyTorch's DistributedSampler rules.

- The epoch's order is a permutation that depends only on ``(seed, epoch)``,
  never on the number of ranks: 1 rank with batch 64 and 2 ranks with batch
  32 step through the same global batches.
- Rank r takes every ``num_replicas``-th index of it starting at r.
- Unless ``drop_last``, the order is padded by repeating its start so every
  rank gets the same count (ranks must run the same number of steps, or the
  ones with more wait forever in an allreduce); with ``drop_last`` the tail
  that does not divide evenly is left out instead.
"""

from __future__ import annotations

import math

import numpy as np


class DistributedSampler:
    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"DistributedSampler: rank {rank} is not in [0, {num_replicas})")
        if num_samples < num_replicas:
            raise ValueError(f"DistributedSampler: {num_replicas} ranks but only {num_samples} samples; "
                             f"every rank needs at least one (use fewer ranks or more data)")
        if seed < 0:
            raise ValueError(f"DistributedSampler: seed must be >= 0, got {seed}")
        self.n, self.num_replicas, self.rank = int(num_samples), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch = 0
        if self.drop_last and self.n % self.num_replicas:
            self.num_samples = math.ceil((self.n - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(self.n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch: the order is a function of (seed, epoch)."""
        self.epoch = int(epoch)

    def global_order(self) -> np.ndarray:
        """The epoch's order over all ranks, padded or cut to total_size."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        if self.total_size > self.n:
            order = np.resize(order, self.total_size)  # repeats from the start, as often as needed
        return order[:self.total_size]

    def indices(self) -> np.ndarray:
        """This rank's indices for the epoch, in order."""
        return self.global_order()[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples
