"""FAISS index layer: exact search equals numpy brute force; recall reports are right."""

import numpy as np
import pytest

from data_curation.arrays import CurationInputError
from data_curation.index import build_index, exact_search, gpu_available, measure_recall, resolve_device, search
from data_curation.synthetic import random_unit_vectors


def brute_force(queries, database, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = database / np.linalg.norm(database, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ d.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


@pytest.fixture
def pool():
    rng = np.random.default_rng(1)
    # Not normalised on purpose: the index must normalise (inner product == cosine).
    return (rng.standard_normal((700, 24)) * rng.uniform(0.5, 3.0, (700, 1))).astype(np.float32)


def test_flat_search_is_exact_top_k_in_chunks(pool):
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((45, 24)).astype(np.float32)
    index = build_index(pool, "Flat", chunk_rows=128, progress=False)
    sims, ids = search(index, queries, 7, chunk_rows=10, progress=False)
    ref_sims, ref_ids = brute_force(queries, pool, 7)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


def test_streaming_exact_search_matches_brute_force(pool):
    queries = pool[:30] * 2.0
    sims, ids = exact_search(queries, pool, 5, chunk_rows=97)
    ref_sims, ref_ids = brute_force(queries, pool, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


def test_search_resumes_from_saved_chunks(pool, tmp_path):
    index = build_index(pool, "Flat", progress=False)
    full_sims, full_ids = search(index, pool[:40], 3, chunk_rows=16, work_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz"]
    # Overwrite chunk 1 with a sentinel: a resumed search must take it as is, not recompute it.
    np.savez(tmp_path / "chunk_000001.npz", similarities=np.full((16, 3), 7.0, np.float32), ids=np.full((16, 3), -5))
    sims, ids = search(index, pool[:40], 3, chunk_rows=16, work_dir=tmp_path, progress=False)
    assert (ids[16:32] == -5).all() and (sims[16:32] == 7.0).all()
    np.testing.assert_array_equal(ids[:16], full_ids[:16])
    np.testing.assert_array_equal(ids[32:], full_ids[32:])


def reference_recall(index, pool, k, sample_size, seed):
    rows = np.sort(np.random.default_rng(seed).choice(pool.shape[0], sample_size, replace=False))
    _, exact = brute_force(pool[rows], pool, k)
    q = pool[rows] / np.linalg.norm(pool[rows], axis=1, keepdims=True)
    _, approx = index.search(q.astype(np.float32), k)
    return np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)])


def test_recall_report_is_one_for_flat_and_measured_for_ivf():
    rng = np.random.default_rng(3)
    pool = random_unit_vectors(2000, 32, rng)  # no structure: a hard case for IVF
    flat = build_index(pool, "Flat", progress=False)
    assert measure_recall(flat, pool, 10, sample_size=200, seed=5)["recall_at_k"] == 1.0
    ivf = build_index(pool, "IVF64,Flat", search_params="nprobe=2", progress=False)
    report = measure_recall(ivf, pool, 10, sample_size=200, seed=5)
    expected = reference_recall(ivf, pool, 10, 200, 5)
    assert report["recall_at_k"] == pytest.approx(expected)
    assert report["recall_at_k"] < 0.9  # two probes of 64 cells must miss neighbours here


def test_pair_recall_counts_pairs_above_threshold():
    rng = np.random.default_rng(4)
    base = random_unit_vectors(500, 32, rng)
    pool = np.concatenate([base, base[:50] + 0.01 * rng.standard_normal((50, 32)).astype(np.float32)])
    flat = build_index(pool, "Flat", progress=False)
    report = measure_recall(flat, pool, 4, sample_size=550, threshold=0.9, exclude_self=True)
    assert report["exact_pairs_above_threshold"] == 100  # each planted pair, seen from both ends
    assert report["pair_recall"] == 1.0


def test_bad_factory_and_params_are_clear_errors(pool):
    with pytest.raises(CurationInputError, match="factory string 'NotAnIndex'"):
        build_index(pool, "NotAnIndex", progress=False)
    with pytest.raises(CurationInputError, match="search parameters"):
        build_index(pool, "Flat", search_params="nosuchparam=3", progress=False)
    with pytest.raises(CurationInputError, match="device must be one of"):
        resolve_device("tpu")


@pytest.mark.skipif(gpu_available(), reason="a GPU is visible")
def test_gpu_request_without_gpu_is_an_error():
    with pytest.raises(CurationInputError, match="no GPU"):
        resolve_device("gpu")
    assert resolve_device("auto") == "cpu"
