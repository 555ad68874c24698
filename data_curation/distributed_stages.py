"""Stages for pools larger than one machine.

``distributed_kmeans_stage``: `dinov2-curate kmeans --distributed`, started once per process by
torchrun (``torchrun --nproc-per-node 8 -m data_curation.cli kmeans --distributed ...``) or by
srun / submitit on SLURM (the launcher is read from the environment as by the trainer,
dinov2.distributed). Each rank reads its contiguous shard of the selected rows from the
memory-mapped embeddings; rank 0 writes the same files as `kmeans`, so `sample` reads them. The
fingerprint leaves out the world size: 2 processes give the same clusters as 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from .arrays import (CurationInputError, iter_row_chunks, load_array, load_indices, normalized_rows, save_npy_atomic,
                     shard_slice, validate_embeddings, write_text_atomic)
from .choices import KMeansDtype, PickStrategy
from .cluster_counts import resolve_cluster_counts
from .stage_state import StageResult, StageState


def _session(device: str):
    from dinov2.distributed.setup import init_distributed

    cfg = SimpleNamespace(launcher="auto", backend="auto", timeout_minutes=30.0, master_port=None, replicate_degree=1)
    return init_distributed(cfg, device)


def distributed_kmeans_stage(
    embeddings_path, output_dir, *, clusters: Sequence[int], rows_path=None, niter: int = 20,
    resampling_steps: int = 0, sample_size: int = 10, strategy: str = PickStrategy.closest, seed: int = 0,
    dtype: str = KMeansDtype.float32, device: str = "auto",
) -> StageResult:
    import torch.distributed as dist

    from .distributed_kmeans import distributed_hierarchical_kmeans
    from .kmeans import rows_to_level

    pool = load_array(embeddings_path, "embeddings")
    validate_embeddings(pool, f"embeddings ({embeddings_path})")
    rows = np.arange(pool.shape[0], dtype=np.int64) if rows_path is None else np.unique(load_indices(rows_path, pool.shape[0], "rows"))
    clusters = resolve_cluster_counts(clusters, rows.size)
    if rows.size < clusters[0]:
        raise CurationInputError(f"level 1 asks for {clusters[0]} clusters but only {rows.size} rows are given")
    outputs = ["rows.npy", "levels.json"] + [f"level{l}_{n}.npy" for l in range(1, len(clusters) + 1) for n in ("centroids", "assignment", "distances")]
    params = dict(clusters=clusters, niter=niter, resampling_steps=resampling_steps, sample_size=sample_size,
                  strategy=strategy, seed=seed, dtype=dtype, implementation="torch.distributed")
    inputs = [embeddings_path] + ([rows_path] if rows_path is not None else [])
    state = StageState(output_dir, "kmeans", params, inputs, outputs)
    if state.is_complete():
        return state.skipped_result()
    env = _session(device)
    group = env.process_group  # None: one process
    try:
        mine = rows[shard_slice(rows.size, (env.rank, env.world_size))]
        points = np.empty((mine.size, pool.shape[1]), dtype=np.float32)
        for start, stop in iter_row_chunks(mine.size, 65536):
            points[start:stop] = normalized_rows(pool[mine[start:stop]])
        levels = distributed_hierarchical_kmeans(
            points, clusters, niter=niter, resampling_steps=resampling_steps, sample_sizes=[sample_size] * len(clusters),
            strategy=strategy, seed=seed, device=env.device, dtype=dtype, process_group=group,
        )
        work = Path(output_dir) / ".work" / f"kmeans-{state.fingerprint[:16]}"
        work.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(work / f"level1_assignment.rank{env.rank:05d}.npy", levels[0].assignment)
        save_npy_atomic(work / f"level1_distances.rank{env.rank:05d}.npy", levels[0].distances)
        if group is not None:
            dist.barrier(group=group)
        result = None
        if env.is_main:
            state.begin()
            out = Path(output_dir)
            ranks = range(env.world_size)
            levels[0].assignment = np.concatenate([np.load(work / f"level1_assignment.rank{r:05d}.npy") for r in ranks])
            levels[0].distances = np.concatenate([np.load(work / f"level1_distances.rank{r:05d}.npy") for r in ranks])
            for number, level in enumerate(levels, start=1):
                save_npy_atomic(out / f"level{number}_centroids.npy", level.centroids)
                save_npy_atomic(out / f"level{number}_assignment.npy", level.assignment)
                save_npy_atomic(out / f"level{number}_distances.npy", level.distances)
            save_npy_atomic(out / "rows.npy", rows)
            write_text_atomic(out / "levels.json", json.dumps({"clusters": clusters}) + "\n")
            top = np.bincount(rows_to_level(levels, len(clusters)), minlength=clusters[-1])
            result = state.complete({"rows": int(rows.size), "clusters": ",".join(map(str, clusters)),
                                     "processes": env.world_size, "top_level_largest": int(top.max()),
                                     "top_level_smallest": int(top.min())})
        if group is not None:
            dist.barrier(group=group)
        return result if result is not None else StageResult("kmeans", Path(output_dir), skipped=False,
                                                              summary={"rank": env.rank, "processes": env.world_size})
    finally:
        from dinov2.distributed.setup import shutdown

        shutdown(env)
