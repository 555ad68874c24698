"""Self and relative dedup on planted near-duplicate groups and chains."""

import numpy as np
import pytest

from data_curation.arrays import CurationInputError
from data_curation.dedup import components_of, relative_dedup, self_dedup, similarity_graph
from data_curation.index import IndexOptions
from data_curation.stages import relative_dedup_stage, self_dedup_stage
from data_curation.synthetic import planted_near_copies, planted_pool, random_unit_vectors

THRESHOLD = 0.9


@pytest.fixture(scope="module")
def planted():
    return planted_pool(3000, 64, [6, 4, 3, 2, 2, 9], chain_lengths=[3, 5], seed=0)


def lowest_row_per_group(labels):
    return np.array(sorted({int(np.flatnonzero(labels == g)[0]) for g in np.unique(labels)}))


def test_planted_data_is_what_the_test_assumes(planted):
    x = planted.embeddings
    # Background rows are far apart; each chain's ends are below the threshold.
    background = np.flatnonzero(np.bincount(planted.components)[planted.components] == 1)
    sims = x[background[:500]] @ x[background[:500]].T
    assert np.max(sims - 2 * np.eye(500)) < 0.7
    for rows in planted.chains:
        assert x[rows[0]] @ x[rows[1]] > THRESHOLD and x[rows[0]] @ x[rows[2]] < THRESHOLD


@pytest.mark.parametrize("factory,params", [("Flat", ""), ("IVF32,Flat", "nprobe=4"), ("HNSW16", "efSearch=64")])
def test_self_dedup_components_equal_planted_groups(planted, factory, params):
    result = self_dedup(planted.embeddings, 8, THRESHOLD, index=IndexOptions(factory=factory, search_params=params), progress=False,
                        rule="connected")
    np.testing.assert_array_equal(result.components, planted.components)
    np.testing.assert_array_equal(result.keep, lowest_row_per_group(planted.components))
    for rows in planted.chains:  # chains end up in one component although their ends are not similar
        assert np.unique(result.components[rows]).size == 1
    if factory == "Flat":
        assert result.recall is None
    else:
        assert 0.0 <= result.recall["pair_recall"] <= 1.0 and result.recall["exact_pairs_above_threshold"] > 0


def test_default_rule_never_removes_a_row_for_a_chain(planted, tmp_path):
    """representative (default): every removed row is itself similar to the kept row that replaces it."""
    x = planted.embeddings
    result = self_dedup(x, 8, THRESHOLD, progress=False)
    removed = np.setdiff1d(np.arange(x.shape[0]), result.keep)
    representative = result.groups.representative[removed]
    cosine = np.einsum("ij,ij->i", x[removed], x[representative])
    assert (cosine >= THRESHOLD - 1e-6).all() and np.isin(representative, result.keep).all()
    np.testing.assert_allclose(result.groups.link[removed], cosine, atol=1e-5)
    for rows in planted.chains:  # a chain's ends are below the threshold: they never share a group
        assert result.components[rows[0]] != result.components[rows[2]]
    groups = {g: set(np.flatnonzero(planted.components == g)) for g in np.unique(planted.components)}
    for g, members in groups.items():  # plain near-duplicate groups (no chains) still collapse to one row
        if len(members) > 1 and not any(set(c) == members for c in map(set, planted.chains)):
            assert np.unique(result.components[list(members)]).size == 1

    np.save(tmp_path / "embeddings.npy", x)
    (tmp_path / "paths.txt").write_text("".join(f"/pool/{i}.jpg\n" for i in range(x.shape[0])))
    stage = self_dedup_stage(tmp_path / "embeddings.npy", tmp_path / "out", k=8, threshold=THRESHOLD, progress=False)
    assert stage.summary["rows_in"] == x.shape[0] and stage.summary["rows_out"] == result.keep.size
    assert stage.summary["removed_near_duplicate"] == removed.size
    from data_curation.report import read_report

    rows = [r for r in read_report(tmp_path / "out" / "report.csv") if r["decision"] == "removed"]
    assert sorted(int(r["row"]) for r in rows) == removed.tolist()
    assert all(r["representative_path"] == f"/pool/{r['representative_row']}.jpg" and float(r["link"]) >= THRESHOLD - 1e-5 for r in rows)


def test_graph_ignores_self_missing_and_weak_edges():
    ids = np.array([[0, 1, -1], [1, 0, 2], [2, 1, 0]])
    sims = np.array([[1.0, 0.95, -3e38], [1.0, 0.95, 0.5], [1.0, 0.5, 0.2]], dtype=np.float32)
    graph = similarity_graph(ids, sims, 0.9, 3)
    assert sorted(zip(*graph.nonzero())) == [(0, 1), (1, 0)]
    np.testing.assert_array_equal(components_of(graph), [0, 0, 1])


def test_components_are_numbered_by_lowest_row():
    import scipy.sparse

    graph = scipy.sparse.csr_matrix(([1, 1], ([4, 3], [1, 0])), shape=(5, 5))
    np.testing.assert_array_equal(components_of(graph), [0, 1, 2, 0, 1])


def test_relative_dedup_removes_exactly_the_planted_copies():
    rng = np.random.default_rng(7)
    references = random_unit_vectors(300, 64, rng)
    clean = random_unit_vectors(2000, 64, rng)
    copies = planted_near_copies(references, 40, 0.97, rng)
    pool = np.concatenate([clean, copies])
    order = rng.permutation(pool.shape[0])
    pool = pool[order]
    planted_rows = np.flatnonzero(order >= clean.shape[0])
    result = relative_dedup(pool, references, THRESHOLD, progress=False)
    np.testing.assert_array_equal(result.keep, np.setdiff1d(np.arange(pool.shape[0]), planted_rows))
    reference_nearest = (pool @ references.T).max(axis=1)
    np.testing.assert_allclose(result.nearest_similarity, reference_nearest, atol=1e-5)


def test_dedup_stage_is_idempotent_and_resumable(planted, tmp_path):
    path = tmp_path / "embeddings.npy"
    np.save(path, planted.embeddings)
    out = tmp_path / "dedup"
    first = self_dedup_stage(path, out, k=8, threshold=THRESHOLD, index=IndexOptions(chunk_rows=500), progress=False, rule="connected")
    assert not first.skipped and first.summary["kept"] == np.unique(planted.components).size
    assert not (out / ".work").exists()  # partial results are cleaned up
    mtime = (out / "keep.npy").stat().st_mtime_ns
    again = self_dedup_stage(path, out, k=8, threshold=THRESHOLD, index=IndexOptions(chunk_rows=500), progress=False, rule="connected")
    assert again.skipped and "nothing to do" in again.describe()
    assert (out / "keep.npy").stat().st_mtime_ns == mtime
    # Another threshold is another stage run: it is redone, not skipped.
    changed = self_dedup_stage(path, out, k=8, threshold=0.999, index=IndexOptions(chunk_rows=500), progress=False, rule="connected")
    assert not changed.skipped and changed.summary["kept"] == planted.embeddings.shape[0]


BAD_INPUTS = [
    (lambda x: x[:, 0].copy(), {}, "2-D float array"),
    (lambda x: (x * 100).astype(np.int32), {}, "2-D float array"),
    (lambda x: np.where(np.arange(len(x))[:, None] == 5, np.nan, x).astype(np.float32), {}, "NaN/inf or all zeros .first: row 5"),
    (lambda x: np.where(np.arange(len(x))[:, None] == 3, 0.0, x).astype(np.float32), {}, "first: row 3"),
    (lambda x: x[:0], {}, "empty"),
    (lambda x: x, {"threshold": 1.5}, r"threshold must be a cosine similarity in \[-1, 1\]"),
    (lambda x: x, {"k": 50}, "k=50 is larger than"),
]


@pytest.mark.parametrize("make,kwargs,message", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, make, kwargs, message):
    x = random_unit_vectors(40, 8, np.random.default_rng(0))
    path = tmp_path / "bad.npy"
    np.save(path, make(x))
    out = tmp_path / "out"
    with pytest.raises(CurationInputError, match=message):
        self_dedup_stage(path, out, **{"k": 4, "threshold": 0.9, **kwargs}, progress=False)
    assert not out.exists()


def test_relative_dedup_rejects_other_dimension(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "pool.npy", random_unit_vectors(20, 8, rng))
    np.save(tmp_path / "ref.npy", random_unit_vectors(5, 16, rng))
    with pytest.raises(CurationInputError, match="dimension 16 but embeddings have dimension 8"):
        relative_dedup_stage(tmp_path / "pool.npy", [tmp_path / "ref.npy"], tmp_path / "out", threshold=0.9, progress=False)
    assert not (tmp_path / "out").exists()
