"""`dinov2-curate run`: the whole chain from one config.

    [hash-dedup] -> embed -> [filter] -> self-dedup -> relative dedup -> retrieval
        -> hierarchical k-means -> sample -> manifest -> [blur-faces]

hash-dedup runs on the raw images and hands its kept_paths.txt to embed; blur-faces runs on
the selected images only and the manifest then points to the blurred copies.

Each enabled filter narrows the set of pool rows (intersection, in the row numbering of
embeddings.npy); k-means and sampling then run on the surviving rows only. Every stage
lives in its own sub-folder of ``output_dir`` and is skipped when already up to date, so
rerunning the same config does nothing, and a killed run resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
from omegaconf import DictConfig

from . import stages
from .arrays import CurationInputError, read_lines, save_npy_atomic, write_lines_atomic
from .cluster_counts import parse_cluster_counts
from .index import IndexOptions
from .stage_state import StageResult

logger = logging.getLogger(__name__)


def _save_if_changed(path: Path, rows: np.ndarray) -> Path:
    """Keep the file (and its modification time) when the content is unchanged, so stages
    that read it stay up to date on a rerun."""
    if path.is_file():
        existing = np.load(path)
        if existing.shape == rows.shape and np.array_equal(existing, rows):
            return path
    return save_npy_atomic(path, rows)


def run_pipeline(cfg: DictConfig, report: Callable[[str], None] = print) -> dict:
    out = Path(cfg.output_dir)
    index = IndexOptions(**cfg.index)
    results: dict[str, StageResult] = {}

    def record(name: str, result: StageResult) -> StageResult:
        results[name] = result
        report(result.describe())
        return result

    if cfg.kmeans.enabled:  # a bad count fails here, not after embedding and dedup
        parse_cluster_counts(list(cfg.kmeans.clusters))
    if cfg.hash_dedup.enabled and (cfg.embed.embeddings or not cfg.embed.images):
        raise CurationInputError("hash_dedup.enabled needs embed.images (it runs on the raw images, before embedding), "
                                 "not embed.embeddings")
    # 1. embeddings (+ the paths they belong to)
    if cfg.embed.embeddings:
        embeddings = Path(cfg.embed.embeddings)
        paths = embeddings.parent / "paths.txt"
        if not paths.is_file():
            raise CurationInputError(f"embed.embeddings={embeddings} needs a paths.txt beside it for the manifest")
    elif cfg.embed.images:
        e = cfg.embed
        images = e.images
        if cfg.hash_dedup.enabled:
            from .hash_dedup import hash_dedup_stage

            h = cfg.hash_dedup
            record("hash-dedup", hash_dedup_stage(
                e.images, out / "hash_dedup", bits=h.bits, radius=h.radius, thumb_size=h.thumb_size, factory=h.factory,
                search_params=h.search_params, rule=h.rule, basis=h.basis, fit_sample=h.fit_sample, progress=cfg.progress,
            ))
            images = out / "hash_dedup" / "kept_paths.txt"
        options = dict(backbone=e.backbone, weights=e.weights, image_size=e.image_size, resize_size=e.resize_size,
                       batch_size=e.batch_size, num_workers=e.num_workers, device=e.device, dtype=e.dtype,
                       part_size=e.part_size)
        if e.shards > 1:
            from .launch import LaunchOptions
            from .shards import embed_sharded

            record("embed", embed_sharded(images, out / "embed", shards=e.shards, launch=LaunchOptions(launcher=e.launcher),
                                          **options))
        else:
            record("embed", stages.embed_stage(images, out / "embed", progress=cfg.progress, **options))
        embeddings, paths = out / "embed" / "embeddings.npy", out / "embed" / "paths.txt"
    else:
        raise CurationInputError("the config needs embed.images (a folder or list file) or embed.embeddings (a .npy)")
    num_rows = int(np.load(embeddings, mmap_mode="r").shape[0])
    rows = np.arange(num_rows, dtype=np.int64)

    # 2. filters, each in the original row numbering
    if cfg.filter.enabled:
        from .filter_stage import filter_stage

        if not cfg.filter.classifier:
            raise CurationInputError("filter.enabled needs filter.classifier (a head file over the embeddings)")
        record("filter", filter_stage(embeddings, cfg.filter.classifier, out / "filter", threshold=cfg.filter.threshold,
                                      positive=list(cfg.filter.positive), progress=cfg.progress))
        rows = np.intersect1d(rows, np.load(out / "filter" / "keep.npy"))
    if cfg.self_dedup.enabled:
        record("dedup", stages.self_dedup_stage(
            embeddings, out / "dedup", k=min(cfg.self_dedup.k, num_rows - 1), threshold=cfg.self_dedup.threshold,
            index=index, progress=cfg.progress, rule=cfg.self_dedup.rule, index_shards=cfg.self_dedup.index_shards,
        ))
        rows = np.intersect1d(rows, np.load(out / "dedup" / "keep.npy"))
    if cfg.relative_dedup.enabled:
        record("dedup-relative", stages.relative_dedup_stage(
            embeddings, list(cfg.relative_dedup.against), out / "dedup_relative",
            threshold=cfg.relative_dedup.threshold, index=index, progress=cfg.progress,
        ))
        rows = np.intersect1d(rows, np.load(out / "dedup_relative" / "keep.npy"))
    if cfg.retrieval.enabled:
        r = cfg.retrieval
        if not r.queries:
            raise CurationInputError("retrieval.enabled needs retrieval.queries (seed-set embeddings .npy)")
        cluster_based = r.clusters is not None
        record("retrieve", stages.retrieve_stage(
            embeddings, r.queries, out / "retrieve", k=None if cluster_based else r.k, clusters=r.clusters,
            per_cluster=r.per_cluster, index=index, progress=cfg.progress,
        ))
        rows = np.intersect1d(rows, np.load(out / "retrieve" / "selected.npy"))
    filtered = _save_if_changed(out / "filtered_rows.npy", rows)
    report(f"filters: {rows.size} of {num_rows} rows remain")

    # 3. rebalance
    final = filtered
    if cfg.kmeans.enabled:
        km = cfg.kmeans
        clusters = list(km.clusters)
        record("kmeans", stages.kmeans_stage(
            embeddings, out / "kmeans", clusters=clusters, rows_path=filtered, niter=km.niter,
            resampling_steps=km.resampling_steps, sample_sizes=[km.sample_size] * len(clusters),
            strategy=km.strategy, init=km.init, seed=km.seed, device=cfg.index.device, progress=cfg.progress,
        ))
        s = cfg.sampling
        record("sample", stages.sample_stage(out / "kmeans", out / "sample", target=s.target, strategy=s.strategy, seed=s.seed))
        final = out / "sample" / "selected.npy"

    # 4. manifest (of the blurred copies when blur_faces is enabled)
    manifest = Path(cfg.manifest)
    manifest = manifest if manifest.is_absolute() else out / manifest
    if not cfg.blur_faces.enabled:
        record("manifest", stages.manifest_stage(paths, [final], manifest))
    else:
        from .blur_faces import blur_faces_stage

        selected = out / "selected_paths.txt"
        record("manifest", stages.manifest_stage(paths, [final], selected))
        b = cfg.blur_faces
        record("blur-faces", blur_faces_stage(
            selected, out / "blur_faces", cascade=b.cascade, scale_factor=b.scale_factor, min_neighbors=b.min_neighbors,
            min_size=b.min_size, margin=b.margin, strength=b.strength, progress=cfg.progress,
        ))
        blurred = read_lines(out / "blur_faces" / "manifest.txt")
        if not manifest.is_file() or read_lines(manifest) != blurred:
            write_lines_atomic(manifest, blurred)
    return {"manifest": str(manifest), "stages": {name: r.summary for name, r in results.items()}}
