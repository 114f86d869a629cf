"""Deterministic, resumable data order.

The order of epoch e is a permutation drawn from `seed + e`; rank r takes every world-th micro-batch
of it. Position in the data is a pure function of the number of micro-batches consumed, so a resumed
run sees exactly the batches the uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class PairOrder:
    """Yields lists of dataset indices (one micro-batch each) for one rank, from any position.

    `lengths` (optional) enables length grouping: within windows of `group_window` micro-batches of the
    shuffled order, pairs are sorted by length before being cut into micro-batches, and the micro-batches
    are shuffled again. Padding drops; the order stays seeded and resumable, and every pair is still
    seen once per epoch.
    """

    def __init__(
        self,
        num_items: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        lengths: Sequence[int] | None = None,
        group_window: int = 64,
    ):
        self.num_items, self.micro_batch_size, self.seed = num_items, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.lengths, self.group_window = lengths, group_window
        self.batches_per_epoch = num_items // (micro_batch_size * world_size)  # per rank; the tail is dropped
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_items} pairs cannot fill one micro-batch of {micro_batch_size} on each of {world_size} "
                "processes: lower train.micro_batch_size or use more data"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All micro-batches of this rank for `epoch`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=g).tolist()
        size = self.micro_batch_size
        global_batches = [order[i : i + size] for i in range(0, self.batches_per_epoch * size * self.world_size, size)]
        if self.lengths is not None:
            flat = [i for b in global_batches for i in b]
            window = self.group_window * size
            grouped = []
            for start in range(0, len(flat), window):
                chunk = sorted(flat[start : start + window], key=lambda i: self.lengths[i])
                grouped += [chunk[j : j + size] for j in range(0, len(chunk), size)]
            perm = torch.randperm(len(grouped), generator=g).tolist()
            global_batches = [grouped[p] for p in perm]
        return global_batches[self.rank :: self.world_size]

    def iterate(self, start_micro_batch: int = 0) -> Iterator[tuple[int, list[int]]]:
        """Endless (epoch, indices) from the `start_micro_batch`-th micro-batch of this rank."""
        epoch, offset = divmod(start_micro_batch, self.batches_per_epoch)
        while True:
            for indices in self.epoch_batches(epoch)[offset:]:
                yield epoch, indices
            epoch, offset = epoch + 1, 0
