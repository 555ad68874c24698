"""Cluster counts per k-means level: absolute, or relative to the number of rows clustered.

A count is a positive integer (``10000``) or a fraction of the rows written with a trailing
``x`` (``0.01x``: one cluster per 100 rows; ``0.0001x``: one per 10,000), so that one config
fits pools of any size. A relative count resolves to ``round(fraction * rows)``, at least 1,
where ``rows`` is the number of rows the k-means stage clusters (after ``--rows``), for every
level. Counts are checked when parsed (a fraction must lie in (0, 1]); the resolved counts are
what the stage records and fingerprints, so ``0.01x`` over 1,000,000 rows and ``10000`` are the
same run.
"""

from __future__ import annotations

import math
import re
from typing import Sequence, Union

from .arrays import CurationInputError

ClusterCount = Union[int, str]  # 10000 or "0.01x"
_RELATIVE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*[xX]\s*$")


def parse_cluster_count(value) -> ClusterCount:
    """An int (absolute) or the normalised string ``"<fraction>x"`` (relative); an error otherwise."""
    if isinstance(value, bool):
        raise CurationInputError(f"cluster count must be a positive integer or a fraction like 0.01x, got {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        count = int(value)
        if count < 1:
            raise CurationInputError(f"cluster count must be >= 1, got {value!r}")
        return count
    match = _RELATIVE.match(value) if isinstance(value, str) else None
    if match is None:
        raise CurationInputError(
            f"cluster count {value!r} is neither a positive integer (e.g. 10000) nor a fraction of the rows "
            "followed by x (e.g. 0.01x = one cluster per 100 rows)")
    fraction = float(match.group(1))
    if not 0.0 < fraction <= 1.0:
        raise CurationInputError(f"relative cluster count {value!r}: the fraction of rows must lie in (0, 1], got {fraction}")
    return f"{match.group(1)}x"


def parse_cluster_counts(values: Sequence) -> list[ClusterCount]:
    values = list(values)
    if not values:
        raise CurationInputError("give at least one cluster count (level 1 first), e.g. 10000,1000,100 or 0.01x,0.001x")
    return [parse_cluster_count(v) for v in values]


def resolve_cluster_counts(values: Sequence, rows: int) -> list[int]:
    """Absolute counts for ``rows`` clustered rows (relative ones rounded, at least 1)."""
    counts = []
    for value in parse_cluster_counts(values):
        if isinstance(value, int):
            counts.append(value)
        else:
            counts.append(max(1, int(math.floor(float(value[:-1]) * rows + 0.5))))
    return counts
