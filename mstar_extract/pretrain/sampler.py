"""Deterministic, resumable batch sampling shared by the pretraining stages.

Every epoch has one permutation of the dataset (seeded by ``seed + epoch``, identical on all ranks), cut into
global batches of ``batch_size × world_size``; rank r takes the r-th contiguous slice of each global batch.
Hence a run on W processes with batch B sees the same global batches as one process with batch W·B (the
check behind the two-process test), and ``start_batch`` skips batches already done when resuming mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's index lists; drops the last incomplete global batch when ``drop_last``."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation; skip its first ``start_batch`` batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.n // self.global_batch
        return -(-self.n // self.global_batch)

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = order[b * self.global_batch : (b + 1) * self.global_batch]
            if not self.drop_last and len(chunk) < self.global_batch:
                per = -(-len(chunk) // self.world)
                mine = chunk[self.rank * per : (self.rank + 1) * per]
            else:
                mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if mine:
                yield mine
