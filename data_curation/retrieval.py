"""Retrieval of pool images similar to curated seed sets (DINOv2 paper, section 3).

Sample-based: the ``k`` nearest pool rows of every query (seed image); used when the seed
set is large enough to cover its concept by itself.

Cluster-based: when the seed set is small, k-means the pool into ``clusters`` clusters,
find the cluster of every query, and take ``per_cluster`` rows (seeded random choice) from
each cluster that holds at least one query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrays import (
    DEFAULT_CHUNK_ROWS,
    CurationInputError,
    iter_row_chunks,
    normalized_rows,
    validate_embeddings,
    validate_k,
    validate_same_dim,
)
from .index import IndexOptions, is_exact, measure_recall, resolve_device, search
from .kmeans import assign, kmeans


@dataclass
class NearestRetrieval:
    neighbors: np.ndarray  # [queries, k] pool rows, best first (-1 where the index found fewer)
    similarities: np.ndarray  # [queries, k] cosine
    selected: np.ndarray  # sorted unique union of the neighbours
    recall: dict | None


def retrieve_nearest(
    embeddings: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    index: IndexOptions = IndexOptions(),
    work_dir=None,
    progress: bool = True,
) -> NearestRetrieval:
    validate_embeddings(embeddings, "embeddings", index.chunk_rows)
    validate_embeddings(queries, "queries", index.chunk_rows)
    validate_same_dim(queries, embeddings, "queries")
    k = validate_k(k, embeddings.shape[0])
    cache = None if work_dir is None else f"{work_dir}/index.faiss"
    faiss_index = index.build(embeddings, cache_path=cache, progress=progress)
    similarities, neighbors = search(
        faiss_index, queries, k, chunk_rows=index.chunk_rows, progress=progress, desc="retrieve",
        work_dir=None if work_dir is None else f"{work_dir}/knn",
    )
    found = neighbors[neighbors >= 0]
    recall = None
    if not is_exact(faiss_index) and index.recall_sample > 0:
        recall = measure_recall(
            faiss_index, embeddings, k, queries=queries, sample_size=index.recall_sample, seed=index.seed,
            chunk_rows=index.chunk_rows,
        )
    return NearestRetrieval(neighbors, similarities, np.unique(found).astype(np.int64), recall)


@dataclass
class ClusterRetrieval:
    centroids: np.ndarray  # [clusters, d]
    assignment: np.ndarray  # [pool rows] cluster of every pool row
    query_clusters: np.ndarray  # [queries] cluster of every query
    selected: np.ndarray  # sorted pool rows taken from the clusters of the queries


def retrieve_by_clusters(
    embeddings: np.ndarray,
    queries: np.ndarray,
    clusters: int,
    per_cluster: int,
    *,
    niter: int = 20,
    seed: int = 0,
    device: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ClusterRetrieval:
    validate_embeddings(embeddings, "embeddings", chunk_rows)
    validate_embeddings(queries, "queries", chunk_rows)
    validate_same_dim(queries, embeddings, "queries")
    if int(clusters) != clusters or not 1 <= clusters <= embeddings.shape[0]:
        raise CurationInputError(
            f"clusters must be an integer in [1, {embeddings.shape[0]}] (the pool size), got {clusters}"
        )
    if int(per_cluster) != per_cluster or per_cluster < 1:
        raise CurationInputError(f"per_cluster must be a positive integer, got {per_cluster}")
    device = resolve_device(device)
    pool = np.empty(embeddings.shape, dtype=np.float32)
    for start, stop in iter_row_chunks(embeddings.shape[0], chunk_rows):
        pool[start:stop] = normalized_rows(embeddings[start:stop])
    centroids = kmeans(pool, int(clusters), niter=niter, seed=seed, device=device)
    assignment, _ = assign(pool, centroids, chunk_rows)
    query_clusters, _ = assign(normalized_rows(queries), centroids, chunk_rows)
    rng = np.random.default_rng(seed)
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(int(clusters) + 1))
    chosen = []
    for cluster in np.unique(query_clusters):
        members = order[bounds[cluster] : bounds[cluster + 1]]
        take = min(int(per_cluster), members.size)
        chosen.append(rng.choice(members, take, replace=False))
    selected = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.empty(0, dtype=np.int64)
    return ClusterRetrieval(centroids, assignment, query_clusters, selected)
