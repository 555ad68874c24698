"""Turning "these two rows look alike" pairs into groups, and choosing what each group keeps.

Two rules (``choices.GroupRule``):

- ``representative`` (the default of every dedup stage): rows are visited best first; an
  unassigned row founds a group and takes every still-unassigned row linked *to it*. Each
  removed row is therefore linked directly to the row that was kept in its place, and A and C
  are never merged only because both resemble B (no chaining). Every removal can be checked
  by looking at two images.
- ``connected``: connected components of the link graph (scipy.sparse.csgraph), as in the
  DINOv2 paper's copy-detection step; chains A~B~C merge A and C even when they differ. The
  best row of each component is kept and the others are linked to it through the chain (their
  direct link value to it may be missing: reported as NaN).

"Best first" is an order over rows given by the caller (e.g. largest resolution first, then
the original file before re-encodes, then the lowest row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from .arrays import CurationInputError
from .choices import GroupRule, choose


@dataclass
class Groups:
    group: np.ndarray  # [n] group id, numbered in order of each group's lowest row
    representative: np.ndarray  # [n] the kept row of each row's group (itself when kept)
    link: np.ndarray  # [n] link value (distance or similarity) to the representative; NaN if not direct
    keep: np.ndarray  # sorted kept rows (one per group)


def pair_graph(first: np.ndarray, second: np.ndarray, values: np.ndarray, num_rows: int) -> scipy.sparse.csr_matrix:
    """Symmetric sparse graph with the link value on both (i, j) and (j, i); self pairs dropped.
    Values are stored shifted by +1 so that a link value of 0 (identical codes) is not lost as an
    implicit zero."""
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    keep = first != second
    low, high, values = np.minimum(first, second)[keep], np.maximum(first, second)[keep], values[keep]
    # A pair found from both of its rows appears twice: keep it once.
    _, unique = np.unique(low * num_rows + high, return_index=True)
    low, high, values = low[unique], high[unique], values[unique] + 1.0
    rows, cols = np.concatenate([low, high]), np.concatenate([high, low])
    return scipy.sparse.csr_matrix((np.concatenate([values, values]), (rows, cols)), shape=(num_rows, num_rows))


def _number_by_lowest_row(labels: np.ndarray) -> np.ndarray:
    _, first_rows, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first_rows.size, dtype=np.int64)
    rank[np.argsort(first_rows, kind="stable")] = np.arange(first_rows.size)
    return rank[inverse.reshape(-1)]


def group_rows(graph: scipy.sparse.csr_matrix, best_first: np.ndarray, rule: str = GroupRule.representative) -> Groups:
    """Groups of ``graph`` (from :func:`pair_graph`) under ``rule``; ``best_first`` is a
    permutation of the rows, best row first."""
    rule = choose(GroupRule, rule, "group rule")
    n = graph.shape[0]
    best_first = np.asarray(best_first, dtype=np.int64)
    if best_first.shape != (n,) or not np.array_equal(np.sort(best_first), np.arange(n)):
        raise CurationInputError(f"best_first must be a permutation of the {n} rows")
    rank = np.empty(n, dtype=np.int64)
    rank[best_first] = np.arange(n)
    representative = np.full(n, -1, dtype=np.int64)
    link = np.full(n, np.nan, dtype=np.float64)
    graph = graph.tocsr()
    if rule == GroupRule.connected:
        _, labels = connected_components(graph, directed=False)
        best_of_label = np.full(labels.max() + 1, n, dtype=np.int64)
        np.minimum.at(best_of_label, labels, rank)
        representative = best_first[best_of_label[labels]]
        for row in np.flatnonzero(representative != np.arange(n)):
            value = graph[row, representative[row]]
            link[row] = value - 1.0 if value else np.nan
    else:
        indptr, indices, data = graph.indptr, graph.indices, graph.data
        for row in best_first[np.diff(indptr)[best_first] > 0]:
            if representative[row] >= 0:
                continue
            representative[row] = row
            neighbours = indices[indptr[row] : indptr[row + 1]]
            values = data[indptr[row] : indptr[row + 1]]
            free = representative[neighbours] < 0
            representative[neighbours[free]] = row
            link[neighbours[free]] = values[free] - 1.0
        alone = representative < 0
        representative[alone] = np.flatnonzero(alone)
    link[representative == np.arange(n)] = np.nan
    group = _number_by_lowest_row(representative)
    keep = np.flatnonzero(representative == np.arange(n)).astype(np.int64)
    return Groups(group, representative, link, keep)


def best_first_order(*keys: np.ndarray) -> np.ndarray:
    """Rows sorted by ``keys`` (each ascending, the first key most significant), ties by row.
    Pass negated values for "larger is better", e.g. ``best_first_order(-pixels, is_reencode)``."""
    if not keys:
        raise ValueError("best_first_order needs at least one key")
    n = len(keys[0])
    return np.lexsort((np.arange(n),) + tuple(reversed(keys))).astype(np.int64)
