"""The SSL training DataLoader: infinite, sharded, exactly resumable.

Everything random in a batch is a function of (seed, global stream position): the
sampler's permutation, every crop (``SSLDataset``) and the iBOT masks (the official
rule applied to the GLOBAL batch, seeded from its first position; see
``global_batch_masks``). A loader built with
``start = steps_done * batch_size_per_rank * world_size`` therefore yields bitwise
the batches the uninterrupted run would have, with any number of workers, and the
global batch (crops and masks) is the same whether 1 rank or W ranks share it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from .collate import assemble_batch, global_batch_masks, stack_crops
from .masking import MaskingGenerator
from .samplers import InfiniteSampler
from .seeding import STREAM_MASK, STREAM_MASK_SHAPE, numpy_rng, torch_generator
from .ssl_dataset import SSLDataset

# Tag for the generator DataLoader uses to seed its workers; giving it one keeps
# DataLoader from drawing from (and so shifting) the trainer's global torch RNG.
_STREAM_LOADER = 3


class SSLCollate:
    """Picklable collate: the ``collate_data_and_cast`` batch of this rank's samples, with the
    masks the official rule gives them within the global batch (``global_batch_masks``).

    Adds ``positions`` (LongTensor [B], global stream positions), ``targets``
    (LongTensor [B]) and ``n_skipped`` (unreadable files passed over for the batch).
    """

    def __init__(self, seed: int, mask_ratio_tuple: Tuple[float, float], mask_probability: float,
                 dtype: torch.dtype, n_tokens: Optional[int], mask_generator: Optional[MaskingGenerator],
                 rank: int = 0, world_size: int = 1):
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = float(mask_probability)
        self.dtype = dtype
        self.n_tokens = n_tokens
        self.mask_generator = mask_generator

    def __call__(self, samples: Sequence[Tuple[Dict[str, Any], Any]]) -> Dict[str, Any]:
        positions = [int(s[0]["position"]) for s in samples]
        # The sampler gives rank r the positions start + r + W*i of the global batch [start, start + W*B):
        # its first position minus the rank identifies the global batch for the run's lifetime.
        batch_size = len(samples) * self.world_size
        start = positions[0] - self.rank
        global_crops, local_crops = stack_crops(samples)
        n_global = len(global_crops) // len(samples)
        # Crop-major slots as in a single-rank batch of the whole global batch: (crop c, sample at offset o).
        slots = [c * batch_size + p - start for c in range(n_global) for p in positions]

        def rng_for(mask: Optional[int]):
            if mask is None:
                return numpy_rng(self.seed, STREAM_MASK, start)
            return numpy_rng(self.seed, STREAM_MASK_SHAPE, start, mask)

        masks, upperbound = global_batch_masks(slots, n_global * batch_size, self.mask_ratio_tuple,
                                               self.mask_probability, self.n_tokens, self.mask_generator, rng_for)
        n_tokens = self.n_tokens if self.n_tokens is not None else getattr(self.mask_generator, "num_patches", 0)
        batch = assemble_batch(global_crops, local_crops, masks, n_tokens, upperbound, self.dtype)
        batch["positions"] = torch.tensor(positions, dtype=torch.long)
        batch["targets"] = torch.tensor([int(s[1]) for s in samples], dtype=torch.long)
        batch["n_skipped"] = sum(int(s[0].get("n_skipped", 0)) for s in samples)
        return batch


class SSLDataLoader(DataLoader):
    """DataLoader that knows the global stream position of the next batch.

    ``state_dict()["position"]`` is what to pass as ``start`` when resuming; it moves
    forward by one global batch each time a batch is handed to the consumer (not
    when workers prefetch it). A new ``iter()`` continues from that position.
    """

    def __init__(self, *args, infinite_sampler: InfiniteSampler, global_batch_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._infinite_sampler = infinite_sampler
        self._global_batch_size = int(global_batch_size)
        self._position = infinite_sampler.start
        self.skipped_samples = 0  # unreadable files passed over, summed over consumed batches

    @property
    def position(self) -> int:
        return self._position

    def __iter__(self):
        self._infinite_sampler.start = self._position
        for batch in super().__iter__():
            self._position += self._global_batch_size
            self.skipped_samples += int(batch.get("n_skipped", 0)) if isinstance(batch, dict) else 0
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        return dict(self._infinite_sampler.state_dict(), start=self._position,
                    global_batch_size=self._global_batch_size, skipped_samples=self.skipped_samples)


def make_ssl_data_loader(
    dataset: Dataset,
    transform: Callable,
    *,
    batch_size_per_rank: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    mask_ratio_tuple: Tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    n_tokens: Optional[int] = None,
    mask_generator: Optional[MaskingGenerator] = None,
    dtype: torch.dtype = torch.float32,
    shuffle: bool = True,
    pin_memory: Optional[bool] = None,
    prefetch_factor: Optional[int] = None,
) -> SSLDataLoader:
    """Infinite loader of collated SSL batches for one rank.

    ``start`` is the GLOBAL stream position to begin at (``steps_done *
    batch_size_per_rank * world_size`` when resuming). ``pin_memory`` defaults to
    "CUDA is available"; workers are persistent when ``num_workers > 0``.
    """
    if batch_size_per_rank < 1:
        raise ValueError(f"batch_size_per_rank must be >= 1, got {batch_size_per_rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    ssl_dataset = SSLDataset(dataset, transform, seed=seed)
    sampler = InfiniteSampler(len(ssl_dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                              start=start)
    collate = SSLCollate(seed, mask_ratio_tuple, mask_probability, dtype, n_tokens, mask_generator,
                         rank=rank, world_size=world_size)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {}
    if num_workers > 0:
        extra["persistent_workers"] = True
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return SSLDataLoader(
        ssl_dataset,
        batch_sampler=BatchSampler(sampler, batch_size_per_rank, drop_last=True),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        generator=torch_generator(seed, _STREAM_LOADER, rank),
        infinite_sampler=sampler,
        global_batch_size=batch_size_per_rank * world_size,
        **extra,
    )
