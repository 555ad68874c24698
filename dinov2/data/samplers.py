"""Infinite, seeded, rank-sharded batch sampler that resumes at the exact sample.

The run consumes one GLOBAL stream of positions 0, 1, 2, ...; position p belongs to
epoch ``p // sample_count`` and reads element ``p % sample_count`` of that epoch's
permutation (a torch.Generator seeded from (seed, epoch)). The stream is cut into
global batches of W*B consecutive positions, and ``RankLayout`` is THE rule that splits
one global batch over ranks (rank r takes ``batch_start + r + W*i``): nothing else in
the project knows it. Resuming after k steps is ``start = k * W * B``, with any world
size: the global stream does not depend on W.

The sampler yields, per step, this rank's ``SampleKey(index, position, batch_start)``s;
``SSLDataset`` seeds the augmentation of each sample from (seed, position) and the
collate seeds the iBOT masks from ``batch_start``, so a batch is a pure function of its
positions and no worker RNG state needs checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch.utils.data import Sampler

from dinov2.seeding import STREAM_EPOCH, torch_generator


class SampleKey(NamedTuple):
    """What the sampler hands the dataset for one sample."""

    index: int  # dataset index
    position: int  # global stream position (seeds the crops)
    batch_start: int  # first global position of the global batch it belongs to (seeds the masks)


@dataclass(frozen=True)
class RankLayout:
    """How one global batch of ``world_size * batch_size_per_rank`` consecutive positions
    ``[batch_start, batch_start + global_batch_size)`` is split over ranks: rank r takes
    ``batch_start + r + world_size * i`` for ``i < batch_size_per_rank`` (interleaved, so the
    first samples of every global batch are spread over all ranks)."""

    batch_size_per_rank: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if self.batch_size_per_rank < 1:
            raise ValueError(f"batch_size_per_rank must be >= 1, got {self.batch_size_per_rank}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size_per_rank * self.world_size

    def positions(self, batch_start: int) -> range:
        """This rank's global positions in the global batch that starts at ``batch_start``."""
        return range(batch_start + self.rank, batch_start + self.global_batch_size, self.world_size)


class InfiniteSampler(Sampler[List[SampleKey]]):
    """Batch sampler: yields this rank's ``SampleKey``s of each global batch, forever, from ``start``."""

    def __init__(self, sample_count: int, layout: RankLayout = RankLayout(1), shuffle: bool = True, seed: int = 0,
                 start: int = 0):
        if sample_count <= 0:
            raise ValueError(f"sample_count must be positive, got {sample_count}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.sample_count = int(sample_count)
        self.layout = layout
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        # First GLOBAL position of the stream; iteration restarts here (the loader moves
        # it forward as batches are consumed).
        self.start = int(start)
        self._cached: Optional[Tuple[int, torch.Tensor]] = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Dataset indices in the order epoch ``epoch`` visits them."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.shuffle:
            order = torch.randperm(self.sample_count, generator=torch_generator(self.seed, STREAM_EPOCH, epoch))
        else:
            order = torch.arange(self.sample_count)
        self._cached = (epoch, order)
        return order

    def index_at(self, position: int) -> int:
        """Dataset index at a global stream position."""
        epoch, offset = divmod(int(position), self.sample_count)
        return int(self.epoch_order(epoch)[offset])

    def __iter__(self) -> Iterator[List[SampleKey]]:
        batch_start = self.start
        while True:
            yield [SampleKey(self.index_at(p), p, batch_start) for p in self.layout.positions(batch_start)]
            batch_start += self.layout.global_batch_size
