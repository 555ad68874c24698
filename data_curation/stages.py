"""File-level stages: read inputs, validate them before writing anything, run the maths
module, publish the outputs atomically, record completion (see stage_state).

Every stage returns a StageResult; a rerun with the same inputs and parameters returns
``skipped=True`` without doing any work.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from . import dedup, kmeans, report, retrieval, sampling
from .arrays import (
    DEFAULT_CHUNK_ROWS,
    CurationInputError,
    iter_row_chunks,
    load_array,
    load_indices,
    normalized_rows,
    read_lines,
    save_npy_atomic,
    validate_embeddings,
    validate_k,
    validate_same_dim,
    validate_threshold,
    write_lines_atomic,
    write_text_atomic,
)
from .choices import FaissDevice, GroupRule, KMeansInit, PickStrategy, choose
from .cluster_counts import resolve_cluster_counts
from .embed_stage import embed_stage  # noqa: F401  (re-exported: the embed stage lives in embed_stage.py)
from .index import IndexOptions
from .stage_state import StageResult, StageState

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- dedup


def _load_pool(path, what="embeddings", chunk_rows=DEFAULT_CHUNK_ROWS) -> np.ndarray:
    array = load_array(path, what)
    validate_embeddings(array, f"{what} ({path})", chunk_rows)
    return array


def _paths_beside(embeddings_path, rows: int) -> list[str] | None:
    """paths.txt beside an embeddings file (for report.csv and contact sheets), when it matches."""
    paths_file = Path(embeddings_path).parent / "paths.txt"
    paths = read_lines(paths_file) if paths_file.is_file() else None
    return paths if paths is not None and len(paths) == rows else None


def self_dedup_stage(
    embeddings_path, output_dir, *, k: int, threshold: float, index: IndexOptions = IndexOptions(),
    progress: bool = True, rule: str = GroupRule.representative, index_shards: int = 1, launch=None, only_shard: int | None = None,
) -> StageResult:
    """-> components.npy (group id per row), keep.npy (lowest row per group), representative.npy,
    report.csv, contact_sheet.png (when paths.txt lies beside the embeddings); see dedup.py for
    the grouping ``rule``. ``index_shards`` > 1 searches S index shards and merges them (see
    sharded_search.py; ``launch``: as a job array); ``only_shard`` searches that one shard and stops."""
    from . import sharded_search

    pool = _load_pool(embeddings_path, chunk_rows=index.chunk_rows)
    threshold = validate_threshold(threshold)
    rule = choose(GroupRule, rule, "group rule")
    validate_k(k, pool.shape[0], excluding_self=True)
    index.validate(pool.shape[1])
    index_shards = sharded_search.validate_index_shards(index_shards, pool.shape[0])
    params = dict(k=k, threshold=threshold, rule=rule, **index.stage_params(),
                  **({"index_shards": index_shards} if index_shards > 1 else {}))
    state = StageState(output_dir, "dedup", params, [embeddings_path],
                       ["components.npy", "keep.npy", "representative.npy", "report.csv"])
    if state.is_complete():
        return state.skipped_result()
    work = state.begin()
    if only_shard is not None:
        if not 0 <= only_shard < index_shards:
            raise CurationInputError(f"--search-shard {only_shard}: need 0 <= s < --index-shards {index_shards}")
        folder = sharded_search.search_index_shard(pool, only_shard, index_shards, k + 1, index, work, progress)
        return StageResult("dedup", Path(output_dir), skipped=False, summary={"index_shard": f"{only_shard}/{index_shards}", "results": str(folder)})
    knn = None if index_shards == 1 else (lambda kk: sharded_search.sharded_self_knn(
        embeddings_path, pool, kk, index, index_shards, work, launch=launch, progress=progress))
    result = dedup.self_dedup(pool, k, threshold, index=index, work_dir=work, progress=progress, rule=rule, knn=knn)
    save_npy_atomic(Path(output_dir) / "components.npy", result.components)
    save_npy_atomic(Path(output_dir) / "keep.npy", result.keep)
    save_npy_atomic(Path(output_dir) / "representative.npy", result.groups.representative)
    sheet = report.publish_group_decisions(Path(output_dir), "dedup", _paths_beside(embeddings_path, pool.shape[0]),
                                           result.groups, "cosine", f"near duplicate (cosine >= {threshold}) of the kept image")
    summary = {"rows": int(pool.shape[0]), "kept": int(result.keep.size), "edges": result.num_edges,
               **report.summary(pool.shape[0], {"near_duplicate": pool.shape[0] - result.keep.size}, result.keep.size),
               "contact_sheet": str(sheet) if sheet else "none"}
    if result.recall is not None:
        write_text_atomic(Path(output_dir) / "recall.json", json.dumps(result.recall, indent=2) + "\n")
        summary["pair_recall"] = round(result.recall["pair_recall"], 4)
    return state.complete(summary)


def relative_dedup_stage(
    embeddings_path, against: Sequence, output_dir, *, threshold: float, index: IndexOptions = IndexOptions(),
    progress: bool = True,
) -> StageResult:
    """-> keep.npy (rows with no reference at cosine >= threshold), nearest_similarity.npy."""
    pool = _load_pool(embeddings_path, chunk_rows=index.chunk_rows)
    if not against:
        raise CurationInputError("relative dedup needs at least one reference file (--against R.npy)")
    references = [_load_pool(path, "reference embeddings", index.chunk_rows) for path in against]
    for path, ref in zip(against, references):
        validate_same_dim(ref, pool, f"reference embeddings ({path})")
    threshold = validate_threshold(threshold)
    index.validate(pool.shape[1])
    params = dict(threshold=threshold, **index.stage_params())
    state = StageState(output_dir, "dedup-relative", params, [embeddings_path, *against],
                       ["keep.npy", "nearest_similarity.npy", "report.csv"])
    if state.is_complete():
        return state.skipped_result()
    work = state.begin()
    reference = np.concatenate([np.asarray(r, dtype=np.float32) for r in references])
    result = dedup.relative_dedup(pool, reference, threshold, index=index, work_dir=work, progress=progress)
    save_npy_atomic(Path(output_dir) / "nearest_similarity.npy", result.nearest_similarity)
    save_npy_atomic(Path(output_dir) / "keep.npy", result.keep)
    paths = _paths_beside(embeddings_path, pool.shape[0]) or [f"row {r}" for r in range(pool.shape[0])]
    removed = np.flatnonzero(result.nearest_similarity >= threshold)
    report.write_report(Path(output_dir) / "report.csv", [{
        "stage": "dedup-relative", "row": int(r), "path": paths[r], "decision": report.REMOVED, "link_kind": "cosine",
        "link": float(result.nearest_similarity[r]), "reason": f"matches a reference image (cosine >= {threshold})",
    } for r in removed[np.argsort(-result.nearest_similarity[removed], kind="stable")]])
    summary = {"rows": int(pool.shape[0]), "kept": int(result.keep.size), "references": int(reference.shape[0]),
               **report.summary(pool.shape[0], {"matches_reference": removed.size}, result.keep.size)}
    if result.recall is not None:
        write_text_atomic(Path(output_dir) / "recall.json", json.dumps(result.recall, indent=2) + "\n")
        summary["pair_recall"] = round(result.recall["pair_recall"], 4)
    return state.complete(summary)


# ----------------------------------------------------------------------------- retrieval


def retrieve_stage(
    embeddings_path, queries_path, output_dir, *, k: int | None = None, clusters: int | None = None,
    per_cluster: int | None = None, niter: int = 20, index: IndexOptions = IndexOptions(), progress: bool = True,
) -> StageResult:
    """Sample-based (``k``) -> neighbors.npy, similarities.npy, selected.npy; cluster-based
    (``clusters`` + ``per_cluster``) -> selected.npy, query_clusters.npy, assignment.npy,
    centroids.npy. Cluster-based retrieval uses only the seed, device and chunk_rows of ``index``."""
    pool = _load_pool(embeddings_path, chunk_rows=index.chunk_rows)
    queries = _load_pool(queries_path, "queries", index.chunk_rows)
    validate_same_dim(queries, pool, f"queries ({queries_path})")
    by_clusters = clusters is not None or per_cluster is not None
    if by_clusters and (clusters is None or per_cluster is None):
        raise CurationInputError("cluster-based retrieval needs both --clusters N and --per-cluster M")
    if by_clusters == (k is not None):
        raise CurationInputError("give either --k K (sample-based) or --clusters N --per-cluster M (cluster-based), not both")
    if k is not None:
        validate_k(k, pool.shape[0])
        index.validate(pool.shape[1])
        outputs = ["neighbors.npy", "similarities.npy", "selected.npy"]
    else:
        outputs = ["selected.npy", "query_clusters.npy", "assignment.npy", "centroids.npy"]
    # chunk_rows has never been part of this fingerprint; adding it would redo finished runs.
    index_params = {name: value for name, value in index.stage_params().items() if name != "chunk_rows"}
    params = dict(k=k, clusters=clusters, per_cluster=per_cluster, niter=niter, **index_params)
    state = StageState(output_dir, "retrieve", params, [embeddings_path, queries_path], outputs)
    if state.is_complete():
        return state.skipped_result()
    work = state.begin()
    out = Path(output_dir)
    if k is not None:
        result = retrieval.retrieve_nearest(pool, queries, k, index=index, work_dir=work, progress=progress)
        save_npy_atomic(out / "neighbors.npy", result.neighbors)
        save_npy_atomic(out / "similarities.npy", result.similarities)
        summary = {"queries": int(queries.shape[0]), "k": k}
        if result.recall is not None:
            write_text_atomic(out / "recall.json", json.dumps(result.recall, indent=2) + "\n")
            summary["recall_at_k"] = round(result.recall["recall_at_k"], 4)
    else:
        result = retrieval.retrieve_by_clusters(
            pool, queries, clusters, per_cluster, niter=niter, seed=index.seed, device=index.device,
            chunk_rows=index.chunk_rows,
        )
        save_npy_atomic(out / "query_clusters.npy", result.query_clusters)
        save_npy_atomic(out / "assignment.npy", result.assignment)
        save_npy_atomic(out / "centroids.npy", result.centroids)
        summary = {"queries": int(queries.shape[0]), "clusters_hit": int(np.unique(result.query_clusters).size)}
    save_npy_atomic(out / "selected.npy", result.selected)
    summary["selected"] = int(result.selected.size)
    return state.complete(summary)


# ----------------------------------------------------------------------------- k-means


def kmeans_stage(
    embeddings_path, output_dir, *, clusters: Sequence[int], levels: int | None = None, rows_path=None,
    niter: int = 20, resampling_steps: int | list[int] = 0, sample_sizes: list[int] | None = None,
    strategy: str = PickStrategy.closest, init: str = KMeansInit.auto, seed: int = 0, device: str = FaissDevice.auto,
    chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = True,
) -> StageResult:
    """-> rows.npy, levels.json, level{l}_centroids.npy, level{l}_assignment.npy,
    level{l}_distances.npy for l = 1..levels (level 1 assigns rows, level l assigns the
    clusters of level l-1). A count may be relative to the rows clustered ("0.01x")."""
    pool = _load_pool(embeddings_path, chunk_rows=chunk_rows)
    if levels is not None and levels != len(clusters):
        raise CurationInputError(f"--levels {levels} but --clusters lists {len(clusters)} counts ({list(clusters)})")
    rows = np.arange(pool.shape[0], dtype=np.int64) if rows_path is None else np.unique(load_indices(rows_path, pool.shape[0], "rows"))
    clusters = resolve_cluster_counts(clusters, rows.size)  # "0.01x" = 1 % of the rows (cluster_counts.py)
    if rows.size < clusters[0]:
        raise CurationInputError(f"level 1 asks for {clusters[0]} clusters but only {rows.size} rows are given")
    outputs = ["rows.npy", "levels.json"] + [f"level{l}_{n}.npy" for l in range(1, len(clusters) + 1) for n in ("centroids", "assignment", "distances")]
    params = dict(clusters=clusters, niter=niter, resampling_steps=resampling_steps, sample_sizes=sample_sizes,
                  strategy=strategy, init=init, seed=seed)
    inputs = [embeddings_path] + ([rows_path] if rows_path is not None else [])
    state = StageState(output_dir, "kmeans", params, inputs, outputs)
    if state.is_complete():
        return state.skipped_result()
    work = state.begin()
    points = np.empty((rows.size, pool.shape[1]), dtype=np.float32)
    for start, stop in iter_row_chunks(rows.size, chunk_rows):
        points[start:stop] = normalized_rows(pool[rows[start:stop]])
    levels_out = kmeans.hierarchical_kmeans(
        points, clusters, niter=niter, resampling_steps=resampling_steps, sample_sizes=sample_sizes,
        strategy=strategy, init=init, seed=seed, device=device, checkpoint_dir=work, progress=progress,
    )
    out = Path(output_dir)
    for number, level in enumerate(levels_out, start=1):
        save_npy_atomic(out / f"level{number}_centroids.npy", level.centroids)
        save_npy_atomic(out / f"level{number}_assignment.npy", level.assignment)
        save_npy_atomic(out / f"level{number}_distances.npy", level.distances)
    save_npy_atomic(out / "rows.npy", rows)
    write_text_atomic(out / "levels.json", json.dumps({"clusters": clusters}) + "\n")
    top_sizes = np.bincount(kmeans.rows_to_level(levels_out, len(clusters)), minlength=clusters[-1])
    return state.complete({"rows": int(rows.size), "clusters": ",".join(map(str, clusters)),
                           "top_level_largest": int(top_sizes.max()), "top_level_smallest": int(top_sizes.min())})


def sample_stage(clusters_dir, output_dir, *, target: int, strategy: str = PickStrategy.random, seed: int = 0) -> StageResult:
    """-> selected.npy: sorted pool rows of a balanced hierarchical sample of ``target`` rows."""
    clusters_dir = Path(clusters_dir)
    if not (clusters_dir / ".kmeans.done.json").is_file():
        raise CurationInputError(f"{clusters_dir} holds no finished k-means run (run `dinov2-curate kmeans` first)")
    clusters = json.loads((clusters_dir / "levels.json").read_text())["clusters"]
    inputs = [clusters_dir / "rows.npy"] + [clusters_dir / f"level{l}_assignment.npy" for l in range(1, len(clusters) + 1)]
    if int(target) != target or target < 1:
        raise CurationInputError(f"--target must be a positive integer, got {target}")
    state = StageState(output_dir, "sample", dict(target=int(target), strategy=strategy, seed=seed), inputs, ["selected.npy"])
    if state.is_complete():
        return state.skipped_result()
    rows = np.load(clusters_dir / "rows.npy")
    assignments = [np.load(clusters_dir / f"level{l}_assignment.npy") for l in range(1, len(clusters) + 1)]
    distances = np.load(clusters_dir / "level1_distances.npy") if strategy == PickStrategy.closest else None
    positions = sampling.hierarchical_sample(assignments, clusters, int(target), seed=seed, strategy=strategy, level1_distances=distances)
    state.begin()
    selected = np.sort(rows[positions])
    save_npy_atomic(Path(output_dir) / "selected.npy", selected)
    return state.complete({"target": int(target), "selected": int(selected.size), "pool": int(rows.size)})


# ----------------------------------------------------------------------------- manifest


def manifest_stage(paths_path, selections: Sequence, output, *, embeddings_path=None) -> StageResult:
    """Manifest = paths of the rows present in every selection file (one path a line).

    Row i of the selections is line i of ``paths_path``, which must therefore have one line
    per row of the embeddings (``embeddings_path``, by default the ``embeddings.npy`` that
    `embed` wrote beside it): a different count is refused before anything is written."""
    paths = read_lines(paths_path)
    if not paths:
        raise CurationInputError(f"{paths_path} lists no paths")
    beside = Path(paths_path).parent / "embeddings.npy"
    embeddings_path = beside if embeddings_path is None and beside.is_file() else embeddings_path
    if embeddings_path is not None:
        rows = load_array(embeddings_path, "embeddings").shape[0]
        if rows != len(paths):
            raise CurationInputError(
                f"{paths_path} lists {len(paths)} paths but {embeddings_path} has {rows} rows; "
                "row i of the embeddings must be line i of the paths file (were they written by the same embed run?)"
            )
    if not selections:
        raise CurationInputError("give at least one --select file (e.g. keep.npy or selected.npy)")
    chosen = None
    for path in selections:
        rows = np.unique(load_indices(path, len(paths), f"selection {path}"))
        chosen = rows if chosen is None else np.intersect1d(chosen, rows, assume_unique=True)
    output = Path(output)
    state = StageState(output.parent, f"manifest-{output.name}", {}, [paths_path, *selections], [output.name])
    if state.is_complete():
        return state.skipped_result()
    state.begin()
    write_lines_atomic(output, [paths[i] for i in chosen])
    return state.complete({"paths": len(paths), "selected": int(chosen.size), "manifest": str(output)})
