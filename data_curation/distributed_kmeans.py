"""Hierarchical k-means with resampling over many processes (torch.distributed; gloo on CPU,
NCCL on GPUs), for pools larger than one machine (Vo et al. 2024 run it over GPU nodes). The ranks
are those of the process group handed in (``process_group``; None: one process, no collectives),
through the project's collectives (dinov2/collectives.py).

Each rank holds a contiguous shard of the level-1 points (rank order = row order). Every step is
defined on the whole pool, independently of how it is split, so N processes give the same
clusters as one on the same seed:

- initialisation: k-means++ (kmeans.kmeans_plus_plus) on a seeded sample of *global* row ids,
  whose vectors are gathered from their owners (an all-reduce of a zero-filled matrix); it runs
  on every rank (not split), as the single-process kmeans.py does;
- Lloyd iterations: each rank assigns its points (torch, on its device), sums and counts per
  centroid are accumulated in float64 and all-reduced; an empty cluster keeps its centroid;
- resampling: each rank proposes its ``sample_size`` best points per cluster (closest to the
  centroid, or by a random key that is a hash of (seed, step, global row)), the proposals are
  gathered and every rank keeps the global best, ties broken by row id;
- upper levels cluster the level-1 centroids, which every rank holds: they run on every rank
  without collectives and give identical results.

With ``dtype="float64"`` the assignments are identical across world sizes (sums differ in the
last bits only); with float32 distances they are identical up to rounding ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dinov2.collectives import all_gather_objects, all_reduce_

from .arrays import CurationInputError
from .choices import KMeansDtype, PickStrategy, choose
from .kmeans import KMEANS_PP_MAX_CLUSTERS, Level, kmeans_plus_plus

TORCH_DTYPES = {KMeansDtype.float32: torch.float32, KMeansDtype.float64: torch.float64}


@dataclass
class Shard:
    """This rank's slice of a pool split over the ranks of ``group`` (None: one process holding
    everything, no collectives)."""

    offset: int
    total: int
    group: dist.ProcessGroup | None
    device: torch.device

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        all_reduce_(tensor, self.group)
        return tensor

    def all_gather(self, value) -> list:
        return all_gather_objects(value, self.group)


def make_shard(local_rows: int, device: torch.device, process_group: dist.ProcessGroup | None = None) -> Shard:
    """Offsets from the row counts of the ranks of ``process_group`` (all-gathered; None: one process)."""
    counts = all_gather_objects(int(local_rows), process_group)
    rank = 0 if process_group is None else dist.get_rank(process_group)
    return Shard(int(sum(counts[:rank])), int(sum(counts)), process_group, device)


def splitmix_uniform(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on (seed, step, row): splitmix64 of a mixed key."""
    with np.errstate(over="ignore"):
        z = (rows.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64(step) * np.uint64(0xBF58476D1CE4E5B9))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def gather_rows(points: torch.Tensor, global_ids: np.ndarray, shard: Shard) -> np.ndarray:
    """Vectors of ``global_ids`` (sorted) from whichever rank holds them, on every rank."""
    mine = (global_ids >= shard.offset) & (global_ids < shard.offset + points.shape[0])
    buffer = torch.zeros(global_ids.size, points.shape[1], dtype=torch.float64, device=shard.device)
    local = torch.as_tensor(global_ids[mine] - shard.offset, device=points.device)
    buffer[torch.as_tensor(np.flatnonzero(mine), device=shard.device)] = points[local].to(shard.device, torch.float64)
    return shard.all_reduce(buffer).cpu().numpy()


def assign(points: torch.Tensor, centroids: torch.Tensor, chunk_rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (squared L2) of every point: (labels int64, distances float64)."""
    c_norms = (centroids * centroids).sum(1)
    labels, distances = [], []
    for start in range(0, points.shape[0], chunk_rows):
        x = points[start : start + chunk_rows]
        d = (x * x).sum(1, keepdim=True) - 2.0 * x @ centroids.T + c_norms[None, :]
        best, label = d.min(dim=1)
        labels.append(label)
        distances.append(best.clamp_min(0).double())
    if not labels:
        return torch.empty(0, dtype=torch.long, device=points.device), torch.empty(0, dtype=torch.float64, device=points.device)
    return torch.cat(labels), torch.cat(distances)


def lloyd(points: torch.Tensor, centroids: np.ndarray, niter: int, shard: Shard, chunk_rows: int = 16384) -> np.ndarray:
    """``niter`` Lloyd iterations on the points of all ranks; float64 centroids."""
    current = torch.tensor(centroids, dtype=torch.float64, device=shard.device)  # a copy: the caller's array stays
    k = current.shape[0]
    for _ in range(niter):
        labels, _ = assign(points, current.to(points.device, points.dtype))
        sums = torch.zeros(k, points.shape[1], dtype=torch.float64, device=shard.device)
        for start in range(0, points.shape[0], chunk_rows):  # a float64 copy of one chunk at a time, not of the shard
            stop = start + chunk_rows
            sums.index_add_(0, labels[start:stop].to(shard.device), points[start:stop].to(shard.device, torch.float64))
        counts = torch.bincount(labels.to(shard.device), minlength=k).to(torch.float64)
        sums, counts = shard.all_reduce(sums), shard.all_reduce(counts)
        filled = counts > 0
        current[filled] = sums[filled] / counts[filled, None]
    return current.cpu().numpy()


def init_centroids(points: torch.Tensor, candidates: np.ndarray, k: int, seed: int, init_sample: int, shard: Shard) -> np.ndarray:
    """k-means++ on a seeded sample of the global row ids ``candidates`` (sorted); above
    KMEANS_PP_MAX_CLUSTERS clusters (where k-means++ costs more than the k-means), k random rows."""
    rng = np.random.default_rng(seed)
    if k > KMEANS_PP_MAX_CLUSTERS:
        return gather_rows(points, np.sort(rng.choice(candidates, k, replace=False)), shard)
    count = min(candidates.size, max(init_sample, k))
    sample = np.sort(rng.choice(candidates, count, replace=False)) if count < candidates.size else candidates
    return kmeans_plus_plus(gather_rows(points, sample, shard).astype(np.float32), k, rng).astype(np.float64)


def balanced_choice(labels: np.ndarray, distances: np.ndarray, k: int, sample_size: int, strategy: str, seed: int,
                    step: int, shard: Shard) -> np.ndarray:
    """Sorted global ids of the ``sample_size`` best points of every cluster over all ranks."""
    ids = shard.offset + np.arange(labels.size, dtype=np.int64)
    key = distances if strategy == PickStrategy.closest else splitmix_uniform(seed, step, ids)
    order = np.lexsort((ids, key, labels))
    ranks = np.arange(order.size) - np.searchsorted(labels[order], labels[order], side="left")
    proposal = order[ranks < sample_size]
    gathered = shard.all_gather((labels[proposal], key[proposal], ids[proposal]))
    all_labels, all_keys, all_ids = (np.concatenate(parts) for parts in zip(*gathered))
    order = np.lexsort((all_ids, all_keys, all_labels))
    ranks = np.arange(order.size) - np.searchsorted(all_labels[order], all_labels[order], side="left")
    return np.sort(all_ids[order[ranks < sample_size]])


def distributed_kmeans_level(points: torch.Tensor, k: int, shard: Shard, *, niter: int, resampling_steps: int,
                             sample_size: int, strategy: str, seed: int, init_sample: int = 20_000) -> Level:
    strategy = choose(PickStrategy, strategy, "resampling strategy")
    if k > shard.total:
        raise CurationInputError(f"asks for {k} clusters but has only {shard.total} points; use fewer clusters")
    everything = np.arange(shard.total, dtype=np.int64)
    centroids = lloyd(points, init_centroids(points, everything, k, seed, init_sample, shard), niter, shard)
    for step in range(1, resampling_steps + 1):
        labels, distances = assign(points, torch.as_tensor(centroids, device=points.device, dtype=points.dtype))
        chosen = balanced_choice(labels.cpu().numpy(), distances.cpu().numpy(), k, sample_size, strategy, seed, step, shard)
        mine = chosen[(chosen >= shard.offset) & (chosen < shard.offset + points.shape[0])] - shard.offset
        subset = points[torch.as_tensor(mine, device=points.device)]
        start = init_centroids(points, chosen, k, seed + step, init_sample, shard)
        centroids = lloyd(subset, start, niter, shard)
    labels, distances = assign(points, torch.as_tensor(centroids, device=points.device, dtype=points.dtype))
    return Level(centroids.astype(np.float32), labels.cpu().numpy(), distances.cpu().numpy().astype(np.float32))


def distributed_hierarchical_kmeans(local_points: np.ndarray, clusters: list[int], *, niter: int = 20,
                                    resampling_steps: int | list[int] = 0, sample_sizes: list[int] | None = None,
                                    strategy: str = PickStrategy.closest, seed: int = 0, device: str | torch.device = "cpu",
                                    dtype: str = KMeansDtype.float32,
                                    process_group: dist.ProcessGroup | None = None) -> list[Level]:
    """Levels bottom-up over the ranks of ``process_group`` (None: this process alone); level 1 assigns
    this rank's rows only (``Level.assignment`` of level 1 is local), higher levels are the same on every rank."""
    torch_dtype = TORCH_DTYPES[choose(KMeansDtype, dtype, "k-means dtype")]
    if not clusters or any(int(c) < 1 for c in clusters) or any(b > a for a, b in zip(clusters, clusters[1:])):
        raise CurationInputError(f"clusters per level must be positive and not increase from level 1 upwards, got {clusters}")
    n_levels = len(clusters)
    steps = resampling_steps if isinstance(resampling_steps, list) else [resampling_steps] * n_levels
    sizes = sample_sizes if sample_sizes is not None else [10] * n_levels
    device = torch.device(device)
    shard = make_shard(local_points.shape[0], device, process_group)
    current = torch.as_tensor(np.asarray(local_points), dtype=torch_dtype, device=device)
    levels = []
    for number, k in enumerate(clusters, start=1):
        level = distributed_kmeans_level(current, int(k), shard, niter=niter, resampling_steps=int(steps[number - 1]),
                                         sample_size=int(sizes[number - 1]), strategy=strategy, seed=seed + 1000 * number)
        levels.append(level)
        current = torch.as_tensor(level.centroids, dtype=torch_dtype, device=device)
        shard = Shard(0, int(k), None, device)  # upper levels: replicated on every rank
    return levels
