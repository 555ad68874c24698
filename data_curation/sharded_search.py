"""Self k-NN search over index shards, merged: the neighbours of one index, from S smaller ones.

The pool's rows are cut into S contiguous blocks (:func:`data_curation.arrays.shard_slice`).
Shard s indexes only its block (1/S of the index memory; one process, GPU or node per shard)
and searches every row of the pool against it, keeping its top k with the ids translated to
pool rows. Merging the S lists of each row (``faiss.merge_knn_results``) gives the top k over
the whole pool: with an exact index (``Flat``) the same neighbours, hence the same dedup pairs,
as one index (the order of exactly tied similarities aside). A trained index (IVF, PQ) is trained
per shard on a sample of its block, so its misses differ from one big index's; the merged result
is checked against exact search on a sample like any approximate index (``recall.json``).

Each shard's results live in ``WORK/index_shards/sssss-of-SSSSS/`` (resumable per query chunk,
``done`` written last); the merge refuses a set with unfinished shards, naming them.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import submitit

from .arrays import CurationInputError, iter_row_chunks, load_array, save_npy_atomic, shard_slice, write_text_atomic
from .index import IndexOptions, search
from .launch import LaunchOptions, run_array, set_threads


def shard_folder(work_dir: str | Path, shard: int, count: int) -> Path:
    return Path(work_dir) / "index_shards" / f"{shard:05d}-of-{count:05d}"


def validate_index_shards(count: int, num_rows: int) -> int:
    if int(count) != count or not 1 <= count <= num_rows:
        raise CurationInputError(f"--index-shards must be an integer in [1, {num_rows}] (rows in the pool), got {count}")
    return int(count)


def search_index_shard(pool: np.ndarray, shard: int, count: int, k: int, index: IndexOptions, work_dir,
                       progress: bool = True) -> Path:
    """Index block ``shard`` of ``count``, search all rows of ``pool`` in it; save the top ``k``
    (similarities float32, pool-row ids int64, -1 where the block has fewer than k rows)."""
    folder = shard_folder(work_dir, shard, count)
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = shard_slice(pool.shape[0], (shard, count))
    faiss_index = index.build(pool[rows], cache_path=folder / "index.faiss", progress=progress)
    similarities, ids = search(faiss_index, pool, k, chunk_rows=index.chunk_rows, work_dir=folder / "knn",
                               progress=progress, desc=f"index shard {shard}/{count}: k-NN")
    ids = np.where(ids >= 0, ids + rows.start, -1)
    save_npy_atomic(folder / "similarities.npy", similarities)
    save_npy_atomic(folder / "ids.npy", ids)
    write_text_atomic(folder / "done", f"rows {rows.start}-{rows.stop - 1}\n")  # last: marks the shard finished
    return folder


def merge_index_shards(work_dir, count: int, num_rows: int, k: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` per row over all shards (best first), from the shards' saved lists."""
    unfinished = [s for s in range(count) if not (shard_folder(work_dir, s, count) / "done").is_file()]
    if unfinished:
        raise CurationInputError(f"index shards {unfinished} of {count} have not finished their search "
                                 f"(under {Path(work_dir) / 'index_shards'}); run them before merging")
    parts = [(np.load(shard_folder(work_dir, s, count) / "similarities.npy", mmap_mode="r"),
              np.load(shard_folder(work_dir, s, count) / "ids.npy", mmap_mode="r")) for s in range(count)]
    similarities = np.empty((num_rows, k), dtype=np.float32)
    ids = np.empty((num_rows, k), dtype=np.int64)
    for start, stop in iter_row_chunks(num_rows, chunk_rows):
        all_sims = np.ascontiguousarray(np.stack([s[start:stop] for s, _ in parts]), dtype=np.float32)
        all_ids = np.ascontiguousarray(np.stack([i[start:stop] for _, i in parts]), dtype=np.int64)
        similarities[start:stop], ids[start:stop] = faiss.merge_knn_results(all_sims, all_ids, keep_max=True)
    return similarities, ids


class SearchShardJob(submitit.helpers.Checkpointable):
    """What each array task runs: :func:`search_index_shard` for one shard (resumable)."""

    def __init__(self, embeddings_path: str, count: int, k: int, index: IndexOptions, work_dir: str,
                 threads: int | None = None):
        self.embeddings_path, self.count, self.k = embeddings_path, count, k
        self.index, self.work_dir, self.threads = index, work_dir, threads

    def __call__(self, shard: int) -> str:
        set_threads(self.threads)
        pool = load_array(self.embeddings_path, "embeddings")
        return str(search_index_shard(pool, shard, self.count, self.k, self.index, self.work_dir, progress=False))


def sharded_self_knn(embeddings_path, pool: np.ndarray, k: int, index: IndexOptions, count: int, work_dir, *,
                     launch: LaunchOptions | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` neighbours of every row (itself included) over ``count`` index shards. The
    unfinished shards run here one after the other (``launch=None``) or as a job array."""
    todo = [s for s in range(count) if not (shard_folder(work_dir, s, count) / "done").is_file()]
    if launch is None:
        for shard in todo:
            search_index_shard(pool, shard, count, k, index, work_dir, progress)
    else:
        job = SearchShardJob(str(Path(embeddings_path).resolve()), count, k, index, str(Path(work_dir).resolve()),
                             launch.threads_per_job(max(len(todo), 1)))
        folder = Path(launch.folder) if launch.folder else Path(work_dir).resolve().parents[1] / "submitit"
        run_array(job, todo, launch, folder, "dinov2-curate-dedup")
    return merge_index_shards(work_dir, count, pool.shape[0], k, index.chunk_rows)
