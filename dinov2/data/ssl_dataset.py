"""Dataset wrapper whose crops are a pure function of (seed, global position).

``InfiniteSampler`` hands out ``SampleKey(index, position, batch_start)``s; here the image at
``index`` is read (skipping unreadable files, see unreadable.py) and transformed
with randomness seeded from (seed, position). A resumed run therefore rebuilds
exactly the same crops without restoring any worker RNG state.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .samplers import SampleKey
from dinov2.seeding import STREAM_AUGMENT, derive_seed
from .unreadable import SkipUnreadable


class Sample(NamedTuple):
    crops: Any  # the transform's output (a dict with "global_crops" and "local_crops" lists)
    key: SampleKey
    skipped: Tuple[int, ...]  # dataset indices of the unreadable files passed over to produce this sample


def _accepts_generator(transform: Callable) -> bool:
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature
        return False


class SSLDataset(Dataset):
    """``dataset[SampleKey(index, position, batch_start)] -> Sample(crops, key, skipped)``; the image's
    label is not used by self-supervised training and is dropped.

    Transforms with a ``generator`` keyword (``DataAugmentationDINO``) get a private
    ``torch.Generator`` and the global RNG is never touched. Any other transform runs
    inside ``torch.random.fork_rng`` with the global torch seed set from
    (seed, position); transforms drawing from ``random`` / ``np.random`` are not
    made reproducible by that.
    """

    def __init__(self, dataset: Dataset, transform: Callable, seed: int = 0):
        self.dataset = dataset if isinstance(dataset, SkipUnreadable) else SkipUnreadable(dataset)
        self.transform = transform
        self.seed = int(seed)
        self._generator_kw = _accepts_generator(transform)

    def __len__(self) -> int:
        return len(self.dataset)

    def _transform(self, image: Any, position: int) -> Any:
        seed = derive_seed(self.seed, STREAM_AUGMENT, position)
        if self._generator_kw:
            g = torch.Generator()
            g.manual_seed(seed)
            return self.transform(image, generator=g)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)

    def __getitem__(self, key: Sequence[int]) -> Sample:
        key = SampleKey(*(int(k) for k in key))
        (image, _), _, n_skipped = self.dataset.load(key.index)
        skipped = tuple((key.index + step) % len(self.dataset) for step in range(n_skipped))
        crops = self._transform(image, key.position)
        if not isinstance(crops, dict):
            raise TypeError(f"the SSL transform must return a dict of crops, got {type(crops).__name__}")
        return Sample(crops, key, skipped)
