"""Length-bucketed batches: random batches of examples of similar length, so little is padding."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

# Batches per pool: a pool is sorted by length before it is cut into batches. Larger pools pad
# less; smaller ones keep each batch's examples closer to a uniform draw.
POOL_BATCHES = 50


class LengthBuckets(Sampler[list[int]]):
    """Index batches for `DataLoader(batch_sampler=...)`, deterministic given seed and epoch.

    Each epoch draws a random order of the examples (from the seed and the epoch), cuts it into
    pools of `pool` batches, sorts each pool by length and splits it into batches, then shuffles
    the batches. Every example appears exactly once per epoch; with `drop_last`, a random
    `len % batch_size` of them sit the epoch out so that every batch is full.

    The epoch advances by one on every pass; `set_epoch` (called by accelerate's data loader
    before each pass, or on resume) sets it explicitly. Given a `generator`, each pass instead
    draws its seed from it, so the trainer's per-epoch reseeding of that generator (which makes
    a killed run resume exactly, see training/resume.py) decides the order.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        pool: int = POOL_BATCHES,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size < 1 or pool < 1:
            raise ValueError("batch_size and pool must be at least 1")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.drop_last, self.pool = batch_size, seed, drop_last, pool
        self.epoch = 0
        self.generator = generator

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int, seed: int | None = None) -> list[list[int]]:
        """The batches of `epoch` (or of a drawn `seed`), in the order they are served."""
        rng = np.random.default_rng([self.seed, epoch] if seed is None else seed)
        order = rng.permutation(len(self.lengths))
        if self.drop_last:
            order = order[: len(order) - len(order) % self.batch_size]
        size = self.pool * self.batch_size
        batches = []
        for start in range(0, len(order), size):
            pool = order[start : start + size]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches += [pool[i : i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        seed = None if self.generator is None else int(torch.randint(2**62, (1,), generator=self.generator))
        yield from self.batches(epoch, seed)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
