"""Near-duplicate removal (DINOv2 paper, section 3 / appendix A).

Self-dedup: a k-NN graph over the pool, keep the edges with cosine >= threshold, then group
the rows (groups.py) by one of two rules:
- ``representative`` (default): rows visited lowest first; each unassigned row keeps itself
  and removes its unassigned neighbours at cosine >= threshold. Every removed row is similar to
  the row kept in its place; no chaining.
- ``connected``: connected components of the graph (scipy.sparse.csgraph), one row (the lowest)
  kept per component, as in the paper's copy-detection pipeline: a~b and b~c put a, b, c in
  one component even when a and c are below the threshold.

Relative dedup: drop every pool row whose nearest reference (evaluation set) row has cosine
>= threshold, so that no test image leaks into the pretraining set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from .arrays import validate_embeddings, validate_k, validate_same_dim, validate_threshold
from .choices import GroupRule, choose
from .groups import Groups, group_rows, pair_graph
from .index import IndexOptions, is_exact, make_index, measure_recall, search


def similarity_graph(ids: np.ndarray, similarities: np.ndarray, threshold: float, num_rows: int) -> scipy.sparse.csr_matrix:
    """Sparse [n, n] adjacency with an edge i->j for every neighbour j of row i (j != i,
    j found, cosine >= threshold). Direction does not matter for components."""
    rows = np.repeat(np.arange(ids.shape[0], dtype=np.int64), ids.shape[1])
    cols = ids.reshape(-1)
    keep = (cols >= 0) & (cols != rows) & (similarities.reshape(-1) >= threshold)
    rows, cols = rows[keep], cols[keep]
    data = np.ones(rows.size, dtype=np.int8)
    return scipy.sparse.csr_matrix((data, (rows, cols)), shape=(num_rows, num_rows))


def components_of(graph: scipy.sparse.spmatrix) -> np.ndarray:
    """Component id per row, numbered in order of each component's lowest row, so the
    result does not depend on scipy's internal numbering."""
    _, labels = connected_components(graph, directed=True, connection="weak")
    _, first_rows, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first_rows, kind="stable")  # component ranks by first row
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse].astype(np.int64)


@dataclass
class SelfDedupResult:
    components: np.ndarray  # [n] component (group) id per row
    keep: np.ndarray  # sorted row indices, one per component
    num_edges: int
    recall: dict | None  # recall vs exact search (approximate indexes only)
    groups: Groups | None = None  # representative and cosine to it per row (groups.py)


def self_dedup(
    embeddings: np.ndarray,
    k: int,
    threshold: float,
    *,
    index: IndexOptions = IndexOptions(),
    work_dir=None,
    progress: bool = True,
    rule: str = GroupRule.representative,
    knn: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> SelfDedupResult:
    """``knn(k)`` replaces the one-index search: the top k (itself included) of every row, e.g.
    merged from index shards (sharded_search.py); its recall is then checked from its results."""
    validate_embeddings(embeddings, "embeddings", index.chunk_rows)
    rule = choose(GroupRule, rule, "group rule")
    threshold = validate_threshold(threshold)
    k = validate_k(k, embeddings.shape[0], excluding_self=True)
    faiss_index = None
    if knn is None:
        cache = None if work_dir is None else f"{work_dir}/index.faiss"
        faiss_index = index.build(embeddings, cache_path=cache, progress=progress)
        # k + 1: a row finds itself; it is dropped when building the graph.
        similarities, ids = search(
            faiss_index, embeddings, k + 1, chunk_rows=index.chunk_rows, progress=progress, desc="self k-NN",
            work_dir=None if work_dir is None else f"{work_dir}/knn",
        )
    else:
        similarities, ids = knn(k + 1)
    graph = similarity_graph(ids, similarities, threshold, embeddings.shape[0])
    rows = np.repeat(np.arange(ids.shape[0], dtype=np.int64), ids.shape[1])
    linked = (ids.reshape(-1) >= 0) & (similarities.reshape(-1) >= threshold)
    groups = group_rows(pair_graph(rows[linked], ids.reshape(-1)[linked], similarities.reshape(-1)[linked],
                                   embeddings.shape[0]), np.arange(embeddings.shape[0]), rule)
    recall = None
    exact = is_exact(faiss_index if faiss_index is not None else make_index(embeddings.shape[1], index.factory))
    if not exact and index.recall_sample > 0:
        recall = measure_recall(
            faiss_index, embeddings, k, sample_size=index.recall_sample, threshold=threshold, exclude_self=True,
            seed=index.seed, chunk_rows=index.chunk_rows,
            results_of_rows=None if knn is None else (lambda rows: (similarities[rows], ids[rows])),
        )
    return SelfDedupResult(groups.group, groups.keep, int(graph.nnz), recall, groups)


@dataclass
class RelativeDedupResult:
    keep: np.ndarray  # sorted pool rows whose nearest reference is below the threshold
    nearest_similarity: np.ndarray  # [n] cosine to the nearest reference row
    recall: dict | None


def relative_dedup(
    embeddings: np.ndarray,
    references: np.ndarray,
    threshold: float,
    *,
    index: IndexOptions = IndexOptions(),
    work_dir=None,
    progress: bool = True,
) -> RelativeDedupResult:
    validate_embeddings(embeddings, "embeddings", index.chunk_rows)
    validate_embeddings(references, "reference embeddings", index.chunk_rows)
    validate_same_dim(references, embeddings, "reference embeddings")
    threshold = validate_threshold(threshold)
    # The references are usually the small side (evaluation sets): index them, query the pool.
    faiss_index = index.build(references, progress=progress)
    similarities, _ = search(
        faiss_index, embeddings, 1, chunk_rows=index.chunk_rows, progress=progress, desc="nearest reference",
        work_dir=None if work_dir is None else f"{work_dir}/knn",
    )
    nearest = similarities[:, 0]
    keep = np.flatnonzero(nearest < threshold).astype(np.int64)
    recall = None
    if not is_exact(faiss_index) and index.recall_sample > 0:
        recall = measure_recall(
            faiss_index, references, 1, queries=embeddings, sample_size=index.recall_sample, threshold=threshold,
            seed=index.seed, chunk_rows=index.chunk_rows,
        )
    return RelativeDedupResult(keep, nearest, recall)
