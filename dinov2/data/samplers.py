"""Infinite, seeded, rank-sharded sampler that resumes at the exact sample.

The run consumes one GLOBAL stream of positions 0, 1, 2, ...; position p belongs to
epoch ``p // sample_count`` and reads element ``p % sample_count`` of that epoch's
permutation (a torch.Generator seeded from (seed, epoch)). Rank r of W takes
positions ``start + r, start + r + W, ...``, so one global batch of B per rank is
the contiguous block of W*B positions. Resuming after k steps is ``start = k * W * B``,
with any world size: the global stream does not depend on W.

The sampler yields ``(index, global_position)`` pairs; ``SSLDataset`` seeds the
augmentation of each sample from (seed, global_position), so crops too are a pure
function of the position and no worker RNG state needs checkpointing.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import Sampler

from .seeding import STREAM_EPOCH, torch_generator


class InfiniteSampler(Sampler):
    def __init__(self, sample_count: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        if sample_count <= 0:
            raise ValueError(f"sample_count must be positive, got {sample_count}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.sample_count = int(sample_count)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
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

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        position = self.start + self.rank
        while True:
            epoch, offset = divmod(position, self.sample_count)
            # Vectorised slice of this rank's share of the rest of the epoch.
            indices = self.epoch_order(epoch)[offset :: self.world_size].tolist()
            for j, index in enumerate(indices):
                yield index, position + j * self.world_size
            position += len(indices) * self.world_size

    def state_dict(self) -> Dict[str, Any]:
        # The world size is deliberately absent: positions are global, so a run may
        # resume on a different number of ranks.
        return {"sample_count": self.sample_count, "shuffle": self.shuffle, "seed": self.seed, "start": self.start}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("sample_count", "shuffle", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}")
        self.start = int(state["start"])
