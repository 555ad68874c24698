"""Planted embeddings with known answers, for tests, benchmarks and demos.

Background rows are random unit vectors (pairwise cosine ~ N(0, 1/dim), far below any
dedup threshold); on top of them we plant
- near-duplicate groups: noisy copies of one direction (pairwise cosine ~ ``group_cosine``);
- chains: points along a great circle with cosine ``chain_step_cosine`` between neighbours,
  so consecutive links are above the threshold while the ends are below it.
The ground truth is the partition of rows into groups (singletons for the background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def random_unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def noisy_copies(direction: np.ndarray, count: int, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit vectors whose pairwise cosine is about ``cosine`` (and about
    sqrt(cosine) to ``direction``)."""
    dim = direction.size
    # member·member ≈ 1 / (1 + dim·s²)  =>  s² = (1/cosine - 1) / dim
    scale = np.sqrt((1.0 / cosine - 1.0) / dim)
    x = direction[None, :] + scale * rng.standard_normal((count, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def chain(length: int, dim: int, step_cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Points p_i = cos(iθ) u + sin(iθ) v with cos θ = step_cosine."""
    u, v = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T
    angles = np.arange(length) * np.arccos(step_cosine)
    return (np.cos(angles)[:, None] * u + np.sin(angles)[:, None] * v).astype(np.float32)


@dataclass
class PlantedPool:
    embeddings: np.ndarray  # [n, dim] unit rows, shuffled
    components: np.ndarray  # [n] ground-truth group id, numbered by each group's lowest row
    chains: list[np.ndarray]  # row indices of each planted chain, in chain order


def planted_pool(
    num_background: int,
    dim: int,
    group_sizes: list[int],
    *,
    chain_lengths: list[int] = (),
    group_cosine: float = 0.98,
    chain_step_cosine: float = 0.95,
    num_concepts: int = 0,
    concept_cosine: float = 0.4,
    seed: int = 0,
) -> PlantedPool:
    """With ``num_concepts`` > 0 the background is a mixture of that many concepts (pairwise
    cosine ~ ``concept_cosine`` inside a concept, like real embeddings, still far below a
    dedup threshold) instead of unstructured random vectors."""
    rng = np.random.default_rng(seed)
    if num_concepts > 0:
        concepts = random_unit_vectors(num_concepts, dim, rng)
        members = rng.integers(0, num_concepts, num_background)
        background = np.empty((num_background, dim), dtype=np.float32)
        for concept in range(num_concepts):
            rows = np.flatnonzero(members == concept)
            background[rows] = noisy_copies(concepts[concept], rows.size, concept_cosine, rng)
    else:
        background = random_unit_vectors(num_background, dim, rng)
    blocks = [background]
    labels = [np.arange(num_background)]
    next_label = num_background
    for size in group_sizes:
        blocks.append(noisy_copies(random_unit_vectors(1, dim, rng)[0], size, group_cosine, rng))
        labels.append(np.full(size, next_label))
        next_label += 1
    chain_labels = []
    for length in chain_lengths:
        blocks.append(chain(length, dim, chain_step_cosine, rng))
        labels.append(np.full(length, next_label))
        chain_labels.append(next_label)
        next_label += 1
    embeddings = np.concatenate(blocks).astype(np.float32)
    raw = np.concatenate(labels)
    order = rng.permutation(embeddings.shape[0])
    embeddings, raw = embeddings[order], raw[order]
    position_of = np.empty_like(order)
    position_of[order] = np.arange(order.size)
    # Chains in chain order, as row indices after the shuffle.
    chain_rows, start = [], num_background + sum(group_sizes)
    for length in chain_lengths:
        chain_rows.append(position_of[start : start + length])
        start += length
    return PlantedPool(embeddings, canonical_labels(raw), chain_rows)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel groups 0, 1, 2, ... in order of their first row (to compare partitions)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse]


def planted_near_copies(references: np.ndarray, count: int, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """One noisy copy (cosine ~ ``cosine`` to its source) of ``count`` random reference rows."""
    sources = rng.choice(references.shape[0], count, replace=False)
    dim = references.shape[1]
    scale = np.sqrt((1.0 / cosine**2 - 1.0) / dim)
    x = references[sources] + scale * rng.standard_normal((count, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def long_tailed_mixture(
    sizes: list[int], dim: int, *, spread: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated clusters of the given sizes: (unit rows, cluster label per row)."""
    rng = np.random.default_rng(seed)
    centres = random_unit_vectors(len(sizes), dim, rng)
    rows, labels = [], []
    for label, (centre, size) in enumerate(zip(centres, sizes)):
        x = centre[None, :] + spread / np.sqrt(dim) * rng.standard_normal((size, dim), dtype=np.float32)
        rows.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        labels.append(np.full(size, label))
    order = rng.permutation(sum(sizes))
    return np.concatenate(rows)[order].astype(np.float32), np.concatenate(labels)[order]
