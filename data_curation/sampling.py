"""Balanced hierarchical sampling from a hierarchical k-means tree (Vo et al. 2024).

The target is split evenly over the top-level clusters; a cluster smaller than its share
gives all its rows and the rest is redistributed over the larger ones ("water filling":
the largest cap c with sum(min(size_i, c)) <= target, plus one more row for a seeded random
choice of the clusters above the cap to hit the target exactly). Each cluster's share is
then split the same way over its child clusters, down to level 1, where rows are drawn at
random (or the ones closest to the centroid).

The result: concepts (clusters) end up with equal shares, however long-tailed the pool.
"""

from __future__ import annotations

import numpy as np

from .arrays import CurationInputError
from .choices import PickStrategy, choose


def balanced_allocation(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Per-cluster counts: water filling of ``target`` over clusters of ``sizes`` rows.

    Returns ``sizes`` itself when the target covers everything.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if target < 0:
        raise CurationInputError(f"sampling target must be >= 0, got {target}")
    if sizes.sum() <= target:
        return sizes.copy()
    # Largest cap c with sum(min(sizes, c)) <= target, by bisection on c in [0, max size].
    low, high = 0, int(sizes.max())
    while low < high:
        middle = (low + high + 1) // 2
        if np.minimum(sizes, middle).sum() <= target:
            low = middle
        else:
            high = middle - 1
    counts = np.minimum(sizes, low)
    remainder = int(target - counts.sum())
    if remainder:
        above_cap = np.flatnonzero(sizes > low)  # more than `remainder` of them, by maximality of low
        counts[rng.choice(above_cap, remainder, replace=False)] += 1
    return counts


def cluster_sizes(level_assignments: list[np.ndarray], level_clusters: list[int]) -> list[np.ndarray]:
    """Rows per cluster at every level (level 1 counts rows, higher levels add up children)."""
    sizes = [np.bincount(level_assignments[0], minlength=level_clusters[0]).astype(np.int64)]
    for assignment, k in zip(level_assignments[1:], level_clusters[1:]):
        sizes.append(np.bincount(assignment, weights=sizes[-1], minlength=k).astype(np.int64))
    return sizes


def hierarchical_sample(
    level_assignments: list[np.ndarray],
    level_clusters: list[int],
    target: int,
    *,
    seed: int = 0,
    strategy: str = PickStrategy.random,
    level1_distances: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted positions (into the rows clustered at level 1) of a balanced sample.

    ``level_assignments[0]`` maps each row to its level-1 cluster, ``level_assignments[l]``
    maps each level-l cluster to its level-(l+1) cluster.
    """
    strategy = choose(PickStrategy, strategy, "sampling strategy")
    if strategy == PickStrategy.closest and level1_distances is None:
        raise CurationInputError("strategy 'closest' needs the level-1 distances of the k-means run")
    if int(target) != target or target < 1:
        raise CurationInputError(f"sampling target must be a positive integer, got {target}")
    rng = np.random.default_rng(seed)
    sizes = cluster_sizes(level_assignments, level_clusters)
    counts = balanced_allocation(sizes[-1], int(target), rng)
    # Top-down: split every cluster's count over its children.
    for level in range(len(level_assignments) - 1, 0, -1):
        parent_of_child = level_assignments[level]
        child_counts = np.zeros(level_clusters[level - 1], dtype=np.int64)
        children_by_parent = _members_by_group(parent_of_child, level_clusters[level])
        for parent in np.flatnonzero(counts):
            children = children_by_parent[parent]
            child_counts[children] = balanced_allocation(sizes[level - 1][children], int(counts[parent]), rng)
        counts = child_counts
    rows_by_cluster = _members_by_group(level_assignments[0], level_clusters[0])
    chosen = []
    for cluster in np.flatnonzero(counts):
        members = rows_by_cluster[cluster]
        if strategy == PickStrategy.random:
            chosen.append(rng.choice(members, int(counts[cluster]), replace=False))
        else:
            closest_first = members[np.argsort(level1_distances[members], kind="stable")]
            chosen.append(closest_first[: int(counts[cluster])])
    if not chosen:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _members_by_group(groups: np.ndarray, num_groups: int) -> list[np.ndarray]:
    order = np.argsort(groups, kind="stable")
    bounds = np.searchsorted(groups[order], np.arange(num_groups + 1))
    return [order[bounds[g] : bounds[g + 1]] for g in range(num_groups)]
