"""Sample-based retrieval equals brute force; cluster-based retrieval stays in the clusters of the queries."""

import numpy as np
import pytest

from data_curation.arrays import CurationInputError
from data_curation.index import IndexOptions
from data_curation.retrieval import retrieve_by_clusters, retrieve_nearest
from data_curation.stages import retrieve_stage
from data_curation.synthetic import long_tailed_mixture, random_unit_vectors


def test_sample_based_retrieval_equals_brute_force():
    rng = np.random.default_rng(0)
    pool = random_unit_vectors(1500, 32, rng)
    queries = random_unit_vectors(25, 32, rng) * 3.0
    result = retrieve_nearest(pool, queries, 6, index=IndexOptions(chunk_rows=7), progress=False)
    sims = (queries / 3.0).astype(np.float64) @ pool.astype(np.float64).T
    ref_ids = np.argsort(-sims, axis=1)[:, :6]
    np.testing.assert_array_equal(result.neighbors, ref_ids)
    np.testing.assert_allclose(result.similarities, np.take_along_axis(sims, ref_ids, axis=1), atol=1e-5)
    np.testing.assert_array_equal(result.selected, np.unique(ref_ids))
    assert result.recall is None


def test_approximate_retrieval_reports_recall():
    rng = np.random.default_rng(1)
    pool = random_unit_vectors(3000, 32, rng)
    result = retrieve_nearest(pool, pool[:50], 5, index=IndexOptions(factory="IVF32,Flat", search_params="nprobe=32"), progress=False)
    assert result.recall["recall_at_k"] == 1.0  # probing every cell is exhaustive
    np.testing.assert_array_equal(result.neighbors[:, 0], np.arange(50))


def test_cluster_based_retrieval_takes_rows_from_the_query_clusters():
    x, labels = long_tailed_mixture([400, 300, 200, 100, 50], 32, seed=3)
    rng = np.random.default_rng(4)
    # Two queries near cluster 1, one near cluster 4.
    queries = x[[np.flatnonzero(labels == 1)[0], np.flatnonzero(labels == 1)[5], np.flatnonzero(labels == 4)[0]]]
    queries = queries + 0.01 * rng.standard_normal(queries.shape).astype(np.float32)
    result = retrieve_by_clusters(x, queries, 5, 80, seed=0)
    assert set(labels[result.selected]) == {1, 4}
    assert np.sum(labels[result.selected] == 1) == 80 and np.sum(labels[result.selected] == 4) == 50
    assert result.query_clusters[0] == result.query_clusters[1] != result.query_clusters[2]


def test_retrieve_stage_outputs_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    np.save(tmp_path / "pool.npy", random_unit_vectors(100, 16, rng))
    np.save(tmp_path / "queries.npy", random_unit_vectors(4, 16, rng))
    np.save(tmp_path / "queries8.npy", random_unit_vectors(4, 8, rng))
    out = tmp_path / "out"
    result = retrieve_stage(tmp_path / "pool.npy", tmp_path / "queries.npy", out, k=3, progress=False)
    neighbors = np.load(out / "neighbors.npy")
    assert neighbors.shape == (4, 3) and np.load(out / "similarities.npy").shape == (4, 3)
    np.testing.assert_array_equal(np.load(out / "selected.npy"), np.unique(neighbors))
    assert result.summary["selected"] == np.unique(neighbors).size
    assert retrieve_stage(tmp_path / "pool.npy", tmp_path / "queries.npy", out, k=3, progress=False).skipped
    bad = tmp_path / "bad"
    with pytest.raises(CurationInputError, match="k=101 is larger than the 100 rows"):
        retrieve_stage(tmp_path / "pool.npy", tmp_path / "queries.npy", bad, k=101, progress=False)
    with pytest.raises(CurationInputError, match="dimension 8 but embeddings have dimension 16"):
        retrieve_stage(tmp_path / "pool.npy", tmp_path / "queries8.npy", bad, k=3, progress=False)
    with pytest.raises(CurationInputError, match="not both"):
        retrieve_stage(tmp_path / "pool.npy", tmp_path / "queries.npy", bad, k=3, clusters=4, per_cluster=2, progress=False)
    with pytest.raises(CurationInputError, match="both --clusters N and --per-cluster M"):
        retrieve_stage(tmp_path / "pool.npy", tmp_path / "queries.npy", bad, clusters=4, progress=False)
    assert not bad.exists()
