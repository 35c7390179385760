"""Training randomness that a resumed run reproduces bitwise.

Lightning's checkpoint restores weights, optimizer, learning-rate schedule and step count, but
not where the data loader was inside its epoch, nor the random number generators. Here both are
pure functions of the run's seed and a position, so a run resumed from any checkpoint draws
exactly what the uninterrupted run drew:

- the data order of epoch ``e`` is a permutation seeded by ``seed + e`` (as torch's
  ``DistributedSampler``), and a resumed epoch skips the batches already consumed
  (:class:`ResumableSampler`);
- everything random inside training batch ``b`` (t, ε, dropout, flips) runs under generators
  seeded by ``mix(seed, b, rank)`` (:func:`seeded`), so whatever else draws random numbers
  between two batches (validation, sample grids, FID) changes nothing, and every DDP rank draws
  its own noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import Dataset, DistributedSampler

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*keys: int) -> int:
    """A 63-bit seed from integers (SplitMix64 chained over the keys): nearby keys such as
    consecutive batch numbers give unrelated seeds."""
    h = 0
    for key in keys:
        h = _splitmix64(h ^ (int(key) & _MASK64))
    return h & ((1 << 63) - 1)


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block with the global CPU generator (and ``device``'s, if an accelerator) seeded by
    ``seed``; their previous states are restored afterwards."""
    device = torch.device(device)
    accelerator = [] if device.type == "cpu" else [device]
    device_type = "cuda" if device.type == "cpu" else device.type
    with torch.random.fork_rng(devices=accelerator, device_type=device_type):
        torch.default_generator.manual_seed(seed)
        if accelerator:
            with torch.get_device_module(device.type).device(device):
                torch.get_device_module(device.type).manual_seed(seed)
        yield


class ResumableSampler(DistributedSampler):
    """This rank's shard of a permutation seeded by ``seed + epoch`` (torch's DistributedSampler,
    which Lightning leaves in place under DDP), able to start an epoch part-way through.

    ``resume_at(epoch, consumed)`` makes the next pass over ``epoch`` skip the first ``consumed``
    indices of this rank's shard; later passes are whole.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, consumed: int) -> None:
        self._resume = (epoch, consumed)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] :]
        self._resume = None
        return iter(indices)
