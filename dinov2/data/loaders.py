"""The SSL training DataLoader: infinite, sharded, exactly resumable.

Everything random in a batch is a function of (seed, global stream position): the
sampler's permutation, every crop (``SSLDataset``) and the iBOT masks (``SSLCollate``).
A loader built with ``start = steps_done * batch_size_per_rank * world_size`` therefore
yields bitwise the batches the uninterrupted run would have, with any number of workers,
and the global batch (crops and masks) is the same whether 1 rank or W ranks share it.
Pieces: ``InfiniteSampler`` (which positions, split over ranks by ``RankLayout``) ->
``SSLDataset`` (one sample's crops) -> ``SSLCollate`` (``SSLBatch``) -> ``SSLDataLoader``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .collate import SSLBatch, SSLCollate
from .masking import MaskingGenerator
from .samplers import InfiniteSampler, RankLayout
from dinov2.seeding import torch_generator
from .ssl_dataset import SSLDataset

# Tag for the generator DataLoader uses to seed its workers; giving it one keeps
# DataLoader from drawing from (and so shifting) the trainer's global torch RNG.
_STREAM_LOADER = 3


class SSLDataLoader(DataLoader):
    """DataLoader of ``SSLBatch``es that knows the global stream position of the next batch.

    ``position`` is what to pass as ``start`` when resuming; it moves forward by one global
    batch each time a batch is handed to the consumer (not when workers prefetch it). A new
    ``iter()`` continues from that position. ``skipped_files`` holds the dataset indices of the
    unreadable files passed over in the batches consumed so far: each file counts once however often
    it is met, and the trainer checkpoints the set so that the count survives a resume.
    """

    def __init__(self, *args, batch_sampler: InfiniteSampler, **kwargs):
        super().__init__(*args, batch_sampler=batch_sampler, **kwargs)
        self._position = batch_sampler.start
        self.skipped_files: set[int] = set()

    @property
    def position(self) -> int:
        return self._position

    def __iter__(self) -> Iterator[SSLBatch]:
        self.batch_sampler.start = self._position
        for batch, skipped in super().__iter__():
            self._position += self.batch_sampler.layout.global_batch_size
            self.skipped_files.update(skipped)
            yield batch


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
    shuffle: bool = True,
    pin_memory: Optional[bool] = None,
    prefetch_factor: Optional[int] = None,
) -> SSLDataLoader:
    """Infinite loader of ``SSLBatch``es for one rank.

    ``start`` is the GLOBAL stream position to begin at (``steps_done *
    batch_size_per_rank * world_size`` when resuming). ``pin_memory`` defaults to
    "CUDA is available"; workers are persistent when ``num_workers > 0``, each on one core.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    layout = RankLayout(batch_size_per_rank, rank, world_size)
    ssl_dataset = SSLDataset(dataset, transform, seed=seed)
    sampler = InfiniteSampler(len(ssl_dataset), layout, shuffle=shuffle, seed=seed, start=start)
    collate = SSLCollate(seed, layout.global_batch_size, mask_ratio_tuple, mask_probability, mask_generator, n_tokens)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {}
    if num_workers > 0:
        # No cv2.setNumThreads in the workers: in a child forked from a process whose OpenCV pool
        # already ran, it deadlocks (tests/test_data_loaders.py reproduces it).
        extra.update(persistent_workers=True)
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return SSLDataLoader(
        ssl_dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        generator=torch_generator(seed, _STREAM_LOADER, rank),
        **extra,
    )
