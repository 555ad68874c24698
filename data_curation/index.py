"""FAISS nearest-neighbour search over L2-normalised embeddings (inner product = cosine).

Indexes are described by FAISS factory strings ("Flat", "IVF4096,Flat", "HNSW32",
"IVF1024,PQ32", ...). "Flat" is exact; anything else is approximate and should be checked
with :func:`measure_recall` against exact search on a sample of queries.

faiss-cpu is the default; when a faiss build with GPU support is installed and a GPU is
visible, ``device="auto"`` moves the index to the GPU (same results up to float rounding).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from .arrays import DEFAULT_CHUNK_ROWS, CurationInputError, iter_row_chunks, normalized_rows, write_text_atomic
from .choices import FaissDevice, choose

logger = logging.getLogger(__name__)

def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_device(device: str) -> str:
    device = choose(FaissDevice, device, "device")
    if device == "gpu" and not gpu_available():
        raise CurationInputError("device='gpu' but this faiss build has no GPU support or no GPU is visible")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    return device.value


def make_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a factory string, with a readable error when the
    string is not valid."""
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise CurationInputError(
            f"invalid FAISS factory string {factory!r} for dimension {dim} "
            "(expected e.g. 'Flat', 'IVF1024,Flat', 'HNSW32', 'IVF4096,PQ32')"
        ) from exc


def is_exact(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(_cpu_index(index)), faiss.IndexFlat)


def _cpu_index(index: faiss.Index) -> faiss.Index:
    if hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex):
        return faiss.index_gpu_to_cpu(index)
    return index


def _to_gpu(index: faiss.Index) -> faiss.Index:
    resources = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(resources, 0, index)
    except RuntimeError as exc:  # e.g. HNSW has no GPU implementation
        logger.warning("index %s cannot run on the GPU (%s); searching on the CPU", type(index).__name__, exc)
        return index


def set_search_params(index: faiss.Index, search_params: str) -> None:
    """Apply "nprobe=32,efSearch=128"-style parameters (speed/recall trade-off)."""
    if not search_params:
        return
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex) else faiss.ParameterSpace()
    try:
        space.set_index_parameters(index, search_params)
    except RuntimeError as exc:
        raise CurationInputError(
            f"invalid search parameters {search_params!r} for this index (e.g. 'nprobe=32' for IVF, 'efSearch=128' for HNSW)"
        ) from exc


def build_index(
    embeddings: np.ndarray,
    factory: str = "Flat",
    *,
    search_params: str = "",
    device: str = "auto",
    train_size: int = 200_000,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    cache_path: str | Path | None = None,
    progress: bool = True,
) -> faiss.Index:
    """Index every row of ``embeddings`` (normalised on the fly, chunk by chunk).

    Trainable indexes (IVF, PQ) are trained on a seeded random sample of ``train_size``
    rows. When ``cache_path`` is given the filled CPU index is saved there and reloaded on a
    rerun, so a resumed stage does not train again.
    """
    device = resolve_device(device)
    if cache_path is not None and Path(cache_path).is_file():
        logger.info("reusing index from %s", cache_path)
        index = faiss.read_index(str(cache_path))
    else:
        index = make_index(embeddings.shape[1], factory)
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            n_train = min(train_size, embeddings.shape[0])
            rows = np.sort(rng.choice(embeddings.shape[0], n_train, replace=False))
            logger.info("training %s on %d rows", factory, n_train)
            if hasattr(faiss.downcast_index(index), "cp"):
                faiss.downcast_index(index).cp.seed = seed
            index.train(normalized_rows(embeddings[rows]))
        chunks = list(iter_row_chunks(embeddings.shape[0], chunk_rows))
        for start, stop in tqdm(chunks, desc=f"index {factory}", unit="chunk", disable=not progress):
            index.add(normalized_rows(embeddings[start:stop]))
        if cache_path is not None and not isinstance(faiss.downcast_index(index), faiss.IndexFlat):
            # Flat indexes rebuild as fast as they reload; cache only the trained ones.
            tmp = Path(str(cache_path) + ".tmp")
            faiss.write_index(index, str(tmp))
            tmp.replace(cache_path)
    if device == "gpu":
        index = _to_gpu(index)
    set_search_params(index, search_params)
    return index


@dataclass(frozen=True)
class IndexOptions:
    """How dedup and retrieval build, search and check their FAISS index."""

    factory: str = "Flat"  # FAISS factory string: Flat (exact), IVF4096,Flat, HNSW32, IVF4096,PQ32 ...
    search_params: str = ""  # e.g. "nprobe=32" (IVF) or "efSearch=128" (HNSW)
    device: FaissDevice = FaissDevice.auto
    train_size: int = 200_000  # rows used to train IVF / PQ indexes
    recall_sample: int = 1000  # queries for the recall-vs-exact report of approximate indexes (0: skip)
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    seed: int = 0

    def validate(self, dim: int) -> None:
        """Fail on a bad factory string, search parameters or device before any work is done."""
        resolve_device(self.device)
        set_search_params(make_index(dim, self.factory), self.search_params)

    def build(self, embeddings: np.ndarray, *, cache_path: str | Path | None = None, progress: bool = True) -> faiss.Index:
        return build_index(
            embeddings, self.factory, search_params=self.search_params, device=self.device,
            train_size=self.train_size, seed=self.seed, chunk_rows=self.chunk_rows, cache_path=cache_path,
            progress=progress,
        )

    def stage_params(self) -> dict:
        """The options that go into a stage fingerprint. Not the device: CPU and GPU give the
        same results up to float rounding, so a finished stage is not redone on another one."""
        params = asdict(self)
        del params["device"]
        return params


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    work_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "search",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (similarities [n, k] float32, ids [n, k] int64), best first.

    Queries are processed in chunks; with ``work_dir`` each finished chunk is saved there,
    so a search killed half-way resumes at the first missing chunk.
    """
    n = queries.shape[0]
    similarities = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    chunks = list(iter_row_chunks(n, chunk_rows))
    for number, (start, stop) in enumerate(tqdm(chunks, desc=desc, unit="chunk", disable=not progress)):
        part = Path(work_dir) / f"chunk_{number:06d}.npz" if work_dir is not None else None
        if part is not None and part.is_file():
            with np.load(part) as saved:
                similarities[start:stop], ids[start:stop] = saved["similarities"], saved["ids"]
            continue
        sims, found = index.search(normalized_rows(queries[start:stop]), k)
        similarities[start:stop], ids[start:stop] = sims, found
        if part is not None:
            tmp = part.with_suffix(".tmp.npz")
            np.savez(tmp, similarities=sims, ids=found)
            tmp.replace(part)
    return similarities, ids


def exact_search(
    queries: np.ndarray, database: np.ndarray, k: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` by inner product of normalised rows, streaming the database
    in chunks so it never has to fit in memory; used as the reference for recall."""
    q = normalized_rows(queries)
    best_sims = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((q.shape[0], 0), dtype=np.int64)
    for start, stop in iter_row_chunks(database.shape[0], chunk_rows):
        kk = min(k, stop - start)
        sims, ids = faiss.knn(q, normalized_rows(database[start:stop]), kk, faiss.METRIC_INNER_PRODUCT)
        best_sims = np.concatenate([best_sims, sims], axis=1)
        best_ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-best_sims, axis=1, kind="stable")[:, :k]
        best_sims = np.take_along_axis(best_sims, order, axis=1)
        best_ids = np.take_along_axis(best_ids, order, axis=1)
    return best_sims, best_ids


def measure_recall(
    index: faiss.Index,
    database: np.ndarray,
    k: int,
    *,
    queries: np.ndarray | None = None,
    sample_size: int = 1000,
    threshold: float | None = None,
    exclude_self: bool = False,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    results_of_rows=None,
) -> dict:
    """Recall of ``index`` against exact search on a seeded sample of queries.

    ``results_of_rows`` (instead of ``index``): a function giving the already computed
    (similarities, ids) of the sampled query rows, e.g. rows of a merged sharded search.

    Reports ``recall_at_k`` (fraction of the exact top-k ids that the index also returns)
    and, with ``threshold``, ``pair_recall`` (fraction of the exact neighbour pairs with
    cosine >= threshold that the index also finds): the number that matters for dedup.
    ``queries`` defaults to rows of ``database`` itself (self-search; with
    ``exclude_self`` a query's own row does not count as a neighbour).
    """
    source = database if queries is None else queries
    rng = np.random.default_rng(seed)
    n_sample = min(sample_size, source.shape[0])
    rows = np.sort(rng.choice(source.shape[0], n_sample, replace=False))
    sample = np.asarray(source[rows])
    k_search = min(k + (1 if exclude_self else 0), database.shape[0])
    exact_sims, exact_ids = exact_search(sample, database, k_search, chunk_rows=chunk_rows)
    if results_of_rows is None:
        approx_sims, approx_ids = index.search(normalized_rows(sample), k_search)
    else:
        approx_sims, approx_ids = (np.asarray(a)[:, :k_search] for a in results_of_rows(rows))

    def neighbour_pairs(sims, ids, min_similarity):
        pairs = set()
        for qi in range(ids.shape[0]):
            kept = 0
            for s, j in zip(sims[qi], ids[qi]):
                if j < 0 or (exclude_self and j == rows[qi]) or kept == k:
                    continue
                kept += 1
                if min_similarity is None or s >= min_similarity:
                    pairs.add((qi, int(j)))
        return pairs

    exact_topk = neighbour_pairs(exact_sims, exact_ids, None)
    approx_topk = neighbour_pairs(approx_sims, approx_ids, None)
    report = {
        "queries": int(n_sample),
        "k": int(k),
        "recall_at_k": len(exact_topk & approx_topk) / max(len(exact_topk), 1),
    }
    if threshold is not None:
        exact_above = neighbour_pairs(exact_sims, exact_ids, threshold)
        approx_above = neighbour_pairs(approx_sims, approx_ids, threshold)
        report["threshold"] = float(threshold)
        report["exact_pairs_above_threshold"] = len(exact_above)
        report["pair_recall"] = len(exact_above & approx_above) / len(exact_above) if exact_above else 1.0
    return report


def save_recall_report(path: str | Path, report: dict) -> None:
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


__all__ = [
    "IndexOptions",
    "build_index",
    "exact_search",
    "gpu_available",
    "is_exact",
    "make_index",
    "measure_recall",
    "resolve_device",
    "save_recall_report",
    "search",
    "set_search_params",
]
