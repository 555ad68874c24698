"""Skip corrupt, truncated or unreadable samples without stopping training.

One bad JPEG in a million must not kill a week-long run, but it must not be silent
either: each unreadable file is logged once (per process) with the error, counted,
and replaced by the next readable sample in index order. The replacement is a
deterministic function of the index, so exact resume still holds. If no sample at
all can be read, a RuntimeError says so, chained to the last decoding error.
"""

from __future__ import annotations

import logging
from typing import Any, Set, Tuple

from torch.utils.data import Dataset

logger = logging.getLogger(__name__)


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
        describe = getattr(self.dataset, "describe", None)
        return describe(index) if describe is not None else f"index {index}"

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
                    logger.warning("skipping unreadable sample %s: %s: %s", self._describe(current),
                                   type(exc).__name__, exc)
        raise RuntimeError(
            f"none of the {n} samples of {type(self.dataset).__name__} could be read "
            f"(last error: {type(last_error).__name__}: {last_error})"
        ) from last_error

    def __getitem__(self, index: int) -> Any:
        return self.load(index)[0]
