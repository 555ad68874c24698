"""Hierarchical k-means with resampling (Vo et al. 2024, "Automatic Data Curation for
Self-Supervised Learning: A Clustering-Based Approach").

Level 1 clusters the (L2-normalised) embeddings; level l clusters the centroids of level
l-1, so the levels form a tree: row -> level-1 cluster -> level-2 cluster -> ...

Plain k-means puts most centroids where the data is dense (web-scale pools are long-tailed:
many near-identical images of a few popular concepts). The resampling steps move the
centroids towards a uniform cover of the concepts: each step keeps only the ``sample_size``
points closest to each centroid (so a huge cluster counts no more than a small one), reruns
k-means on that balanced sample from a fresh initialisation, and reassigns every point.
Each level's k-means and each resampling step run on FAISS (CPU, or GPU when available);
levels and steps are checkpointed so a killed run resumes.

Initialisation is greedy k-means++ (as in scikit-learn) on a seeded subsample, which finds
small, isolated clusters that FAISS's default random initialisation tends to miss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from .arrays import DEFAULT_CHUNK_ROWS, CurationInputError, iter_row_chunks, save_npy_atomic
from .choices import FaissDevice, KMeansInit, PickStrategy, choose
from .index import resolve_device

logger = logging.getLogger(__name__)

# k-means++ makes k passes over its sample; above this many clusters it costs more than the
# k-means itself on a CPU, so "auto" switches to FAISS's random initialisation.
KMEANS_PP_MAX_CLUSTERS = 2000


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator, local_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding: each new centre is the best (lowest potential) of a few
    candidates drawn with probability proportional to the squared distance to the
    nearest chosen centre."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    n = points.shape[0]
    trials = local_trials if local_trials is not None else 2 + int(np.log(k))
    sq_norms = np.einsum("ij,ij->i", points, points)
    centres = np.empty((k, points.shape[1]), dtype=np.float32)
    first = int(rng.integers(n))
    centres[0] = points[first]
    closest = np.maximum(sq_norms + sq_norms[first] - 2.0 * points @ points[first], 0.0)
    for c in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # fewer distinct points than k: pick the rest at random
            candidates = rng.integers(n, size=trials)
        else:
            cumulative = np.cumsum(closest, dtype=np.float64)
            candidates = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1])
            candidates = np.minimum(candidates, n - 1)
        distances = np.maximum(
            sq_norms[:, None] + sq_norms[candidates][None, :] - 2.0 * points @ points[candidates].T, 0.0
        )
        new_closest = np.minimum(closest[:, None], distances)
        best = int(np.argmin(new_closest.sum(axis=0)))
        centres[c] = points[candidates[best]]
        closest = new_closest[:, best]
    return centres


def assign(points: np.ndarray, centroids: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of every point: (labels int64, squared distances float32)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(points.shape[0], dtype=np.int64)
    distances = np.empty(points.shape[0], dtype=np.float32)
    for start, stop in iter_row_chunks(points.shape[0], chunk_rows):
        d, i = index.search(np.ascontiguousarray(points[start:stop], dtype=np.float32), 1)
        labels[start:stop], distances[start:stop] = i[:, 0], d[:, 0]
    return labels, distances


def kmeans(
    points: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    init_centroids: np.ndarray | None = None,
    init: str = KMeansInit.auto,
    init_sample: int = 20_000,
    device: str = "cpu",
    max_points_per_centroid: int = 256,
) -> np.ndarray:
    """One FAISS k-means run (L2). Initialised from ``init_centroids`` when given, else by
    k-means++ on a subsample of ``init_sample`` points or FAISS's random draw (``init``;
    "auto" = k-means++ up to KMEANS_PP_MAX_CLUSTERS clusters)."""
    init = choose(KMeansInit, init, "k-means init")
    points = np.ascontiguousarray(points, dtype=np.float32)
    use_kmeans_pp = init == "kmeans++" or (init == KMeansInit.auto and k <= KMEANS_PP_MAX_CLUSTERS)
    if init_centroids is None and use_kmeans_pp:
        rng = np.random.default_rng(seed)
        sample = points
        if points.shape[0] > max(init_sample, k):
            sample = points[np.sort(rng.choice(points.shape[0], max(init_sample, k), replace=False))]
        init_centroids = kmeans_plus_plus(sample, k, rng)
    if niter == 0 and init_centroids is not None:
        return np.asarray(init_centroids, dtype=np.float32)
    model = faiss.Kmeans(
        points.shape[1], k, niter=niter, seed=seed, verbose=False, gpu=device == "gpu",
        max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
    )
    if init_centroids is not None:
        init_centroids = np.ascontiguousarray(init_centroids, dtype=np.float32)
    model.train(points, init_centroids=init_centroids)
    return np.asarray(model.centroids, dtype=np.float32)


def balanced_subsample(
    labels: np.ndarray, distances: np.ndarray, sample_size: int, strategy: str, rng: np.random.Generator
) -> np.ndarray:
    """Indices of at most ``sample_size`` points per cluster: the closest to the centroid,
    or a random subset."""
    strategy = choose(PickStrategy, strategy, "resampling strategy")
    key = distances if strategy == PickStrategy.closest else rng.random(labels.size)
    order = np.lexsort((key, labels))  # by cluster, then by key within the cluster
    sorted_labels = labels[order]
    group_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_cluster = np.arange(order.size) - group_start
    return np.sort(order[rank_in_cluster < sample_size])


@dataclass
class Level:
    centroids: np.ndarray  # [k, d]
    assignment: np.ndarray  # cluster of every point of this level (rows, or previous centroids)
    distances: np.ndarray  # squared L2 distance of every point to its centroid


def kmeans_level(
    points: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    resampling_steps: int = 0,
    sample_size: int = 10,
    strategy: str = PickStrategy.closest,
    init: str = KMeansInit.auto,
    seed: int = 0,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    desc: str = "k-means",
) -> Level:
    """k-means on ``points`` followed by ``resampling_steps`` resampling steps."""
    if k > points.shape[0]:
        raise CurationInputError(f"{desc}: asks for {k} clusters but has only {points.shape[0]} points; use fewer clusters")
    centroids = None
    for step in tqdm(range(resampling_steps + 1), desc=desc, unit="step", disable=not progress):
        saved = checkpoint_dir / f"step_{step:03d}_centroids.npy" if checkpoint_dir is not None else None
        if saved is not None and saved.is_file():  # finished before a kill: resume after it
            centroids = np.load(saved)
            continue
        if step == 0:
            centroids = kmeans(points, k, niter=niter, seed=seed, init=init, device=device)
        else:
            # Seeded per step (not one running generator) so a resumed run draws the same samples.
            rng = np.random.default_rng([seed, step])
            labels, distances = assign(points, centroids)
            chosen = balanced_subsample(labels, distances, sample_size, strategy, rng)
            centroids = kmeans(points[chosen], k, niter=niter, seed=seed + step, init=init, device=device)
        if saved is not None:
            save_npy_atomic(saved, centroids)
    labels, distances = assign(points, centroids)
    return Level(centroids, labels, distances)


def hierarchical_kmeans(
    points: np.ndarray,
    clusters: list[int],
    *,
    niter: int = 20,
    resampling_steps: int | list[int] = 0,
    sample_sizes: list[int] | None = None,
    strategy: str = PickStrategy.closest,
    init: str = KMeansInit.auto,
    seed: int = 0,
    device: str = FaissDevice.auto,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> list[Level]:
    """Levels bottom-up; ``clusters[0]`` is the number of level-1 clusters (largest)."""
    device = resolve_device(device)
    if not clusters or any(int(c) < 1 for c in clusters):
        raise CurationInputError(f"clusters must be a non-empty list of positive counts, got {clusters}")
    if any(b > a for a, b in zip(clusters, clusters[1:])):
        raise CurationInputError(f"clusters per level must not increase from level 1 upwards, got {clusters}")
    n_levels = len(clusters)
    steps = resampling_steps if isinstance(resampling_steps, list) else [resampling_steps] * n_levels
    sizes = sample_sizes if sample_sizes is not None else [10] * n_levels
    if len(steps) != n_levels or len(sizes) != n_levels:
        raise CurationInputError(
            f"resampling_steps and sample_sizes need one value per level ({n_levels}), got {steps} and {sizes}"
        )
    levels: list[Level] = []
    current = np.ascontiguousarray(points, dtype=np.float32)
    for number, k in enumerate(clusters, start=1):
        level_dir = None
        if checkpoint_dir is not None:
            level_dir = Path(checkpoint_dir) / f"level{number}"
            level_dir.mkdir(parents=True, exist_ok=True)
        level = kmeans_level(
            current, int(k), niter=niter, resampling_steps=int(steps[number - 1]), sample_size=int(sizes[number - 1]),
            strategy=strategy, init=init, seed=seed + 1000 * number, device=device, checkpoint_dir=level_dir,
            progress=progress, desc=f"k-means level {number} (k={k})",
        )
        levels.append(level)
        current = level.centroids
    return levels


def rows_to_level(levels: list[Level], level: int) -> np.ndarray:
    """Cluster id at ``level`` (1-based) of every row clustered at level 1."""
    labels = levels[0].assignment
    for upper in levels[1:level]:
        labels = upper.assignment[labels]
    return labels
