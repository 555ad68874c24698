"""Unreadable samples (corrupt, truncated, missing files): skipped, counted and named.

One rule for the whole project: one bad JPEG in a million must not stop a run, and it
must not be silent either. Each unreadable file is logged with its name and the error,
counted, and passed over:

- training (``SkipUnreadable``): replaced by the next readable sample in index order. The
  replacement is a deterministic function of the index, so exact resume still holds. If
  no sample at all can be read, a RuntimeError says so, chained to the last error.
- evaluation (``MarkUnreadable`` + ``collate_readable``): dropped from the batch, its
  index reported, so features and labels stay aligned without it.
- curation embed (``data_curation/embed.py``): listed in ``errors.txt``, not embedded.
"""

from __future__ import annotations

import logging
from typing import Any, List, NamedTuple, Optional, Set, Tuple

from torch.utils.data import Dataset, Subset, default_collate

logger = logging.getLogger(__name__)


def describe_sample(dataset: Dataset, index: int) -> str:
    """What sample ``index`` is (its file path where the dataset knows it), through Subsets."""
    while isinstance(dataset, Subset):
        index = int(dataset.indices[index])
        dataset = dataset.dataset
    describe = getattr(dataset, "describe", None)
    return describe(index) if describe is not None else f"{type(dataset).__name__} index {index}"


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def warn_unreadable(name: str, error: str) -> None:
    logger.warning("skipping unreadable sample %s: %s", name, error)


class SkipUnreadable(Dataset):
    """Wrap a map-style dataset; reading index i returns the first readable of i, i+1, ...

    ``num_skipped`` / ``skipped_indices`` count distinct unreadable indices seen by
    this process. DataLoader workers hold their own copies, so the loader instead
    reports skips per batch (``n_skipped`` from ``load``) to the main process.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._skipped: Set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_skipped(self) -> int:
        return len(self._skipped)

    @property
    def skipped_indices(self) -> Tuple[int, ...]:
        return tuple(sorted(self._skipped))

    def _describe(self, index: int) -> str:
        return describe_sample(self.dataset, index)

    def load(self, index: int) -> Tuple[Any, int, int]:
        """(sample, index actually read, number of unreadable samples passed over)."""
        n = len(self.dataset)
        last_error = None
        for step in range(n):
            current = (index + step) % n
            try:
                return self.dataset[current], current, step
            except Exception as exc:  # decoders raise many types (OSError, SyntaxError, zlib.error, ...)
                last_error = exc
                if current not in self._skipped:
                    self._skipped.add(current)
                    warn_unreadable(self._describe(current), error_text(exc))
        raise RuntimeError(
            f"none of the {n} samples of {type(self.dataset).__name__} could be read "
            f"(last error: {type(last_error).__name__}: {last_error})"
        ) from last_error

    def __getitem__(self, index: int) -> Any:
        return self.load(index)[0]


class UnreadableSample(NamedTuple):
    index: int
    name: str
    error: str


class MarkUnreadable(Dataset):
    """Wrap a map-style dataset: item ``i`` is ``(i, dataset[i])``, or ``(i, UnreadableSample)``
    when reading it raises. Nothing is logged here (loader workers may have no logging set
    up): the consumer of ``collate_readable`` batches reports the records."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return index, self.dataset[index]
        except Exception as exc:  # decoders raise many types (OSError, SyntaxError, zlib.error, ...)
            return index, UnreadableSample(int(index), describe_sample(self.dataset, index), error_text(exc))


class ReadableBatch(NamedTuple):
    indices: List[int]  # dataset indices of the readable samples, in batch order
    samples: Optional[Any]  # default_collate of the readable samples; None if there were none
    unreadable: List[UnreadableSample]


def collate_readable(batch) -> ReadableBatch:
    """``collate_fn`` for ``MarkUnreadable`` items: collate the readable ones, list the rest."""
    good = [(i, item) for i, item in batch if not isinstance(item, UnreadableSample)]
    bad = [item for _, item in batch if isinstance(item, UnreadableSample)]
    samples = default_collate([item for _, item in good]) if good else None
    return ReadableBatch([int(i) for i, _ in good], samples, bad)
