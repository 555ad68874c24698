"""`dinov2-curate run`: the whole chain from one config.

    embed -> self-dedup -> relative dedup -> retrieval -> hierarchical k-means -> sample -> manifest

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
from .arrays import CurationInputError, save_npy_atomic
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

    # 1. embeddings (+ the paths they belong to)
    if cfg.embed.embeddings:
        embeddings = Path(cfg.embed.embeddings)
        paths = embeddings.parent / "paths.txt"
        if not paths.is_file():
            raise CurationInputError(f"embed.embeddings={embeddings} needs a paths.txt beside it for the manifest")
    elif cfg.embed.images:
        e = cfg.embed
        record("embed", stages.embed_stage(
            e.images, out / "embed", backbone=e.backbone, weights=e.weights, image_size=e.image_size,
            resize_size=e.resize_size, batch_size=e.batch_size, num_workers=e.num_workers, device=e.device,
            dtype=e.dtype, part_size=e.part_size, progress=cfg.progress,
        ))
        embeddings, paths = out / "embed" / "embeddings.npy", out / "embed" / "paths.txt"
    else:
        raise CurationInputError("the config needs embed.images (a folder or list file) or embed.embeddings (a .npy)")
    num_rows = int(np.load(embeddings, mmap_mode="r").shape[0])
    rows = np.arange(num_rows, dtype=np.int64)

    # 2. filters, each in the original row numbering
    if cfg.self_dedup.enabled:
        record("dedup", stages.self_dedup_stage(
            embeddings, out / "dedup", k=min(cfg.self_dedup.k, num_rows - 1), threshold=cfg.self_dedup.threshold,
            index=index, progress=cfg.progress,
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

    # 4. manifest
    manifest = Path(cfg.manifest)
    manifest = manifest if manifest.is_absolute() else out / manifest
    record("manifest", stages.manifest_stage(paths, [final], manifest))
    return {"manifest": str(manifest), "stages": {name: r.summary for name, r in results.items()}}
