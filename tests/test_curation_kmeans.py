"""Hierarchical k-means with resampling and balanced hierarchical sampling."""

import numpy as np
import pytest

from data_curation.arrays import CurationInputError
from data_curation.kmeans import balanced_subsample, hierarchical_kmeans, kmeans_level, rows_to_level
from data_curation.sampling import balanced_allocation, hierarchical_sample
from data_curation.stages import kmeans_stage, sample_stage
from data_curation.synthetic import long_tailed_mixture

SIZES = [2000, 800, 300, 120, 60, 30, 15, 8]


def water_filling_reference(sizes, target):
    """Brute force: the largest cap c with sum(min(size, c)) <= target."""
    sizes = np.asarray(sizes)
    cap = 0
    while np.minimum(sizes, cap + 1).sum() <= target and cap < sizes.max():
        cap += 1
    return cap


@pytest.mark.parametrize("seed", range(20))
def test_balanced_allocation_is_water_filling(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 60, size=rng.integers(1, 12))
    target = int(rng.integers(0, sizes.sum() + 5))
    counts = balanced_allocation(sizes, target, np.random.default_rng(seed))
    assert counts.sum() == min(target, sizes.sum())
    assert (counts <= sizes).all() and (counts >= 0).all()
    if target < sizes.sum():
        cap = water_filling_reference(sizes, target)
        # Every cluster gets min(size, cap), a few of the larger ones one more.
        assert ((counts == np.minimum(sizes, cap)) | ((counts == cap + 1) & (sizes > cap))).all()


def test_balanced_subsample_keeps_closest_per_cluster():
    labels = np.array([0, 0, 0, 1, 1, 2])
    distances = np.array([0.3, 0.1, 0.2, 0.5, 0.4, 0.9], dtype=np.float32)
    chosen = balanced_subsample(labels, distances, 2, "closest", np.random.default_rng(0))
    np.testing.assert_array_equal(chosen, [1, 2, 3, 4, 5])


@pytest.fixture(scope="module")
def mixture():
    return long_tailed_mixture(SIZES, 32, seed=0)


@pytest.fixture(scope="module")
def levels(mixture):
    x, _ = mixture
    return hierarchical_kmeans(x, [24, 8], niter=20, resampling_steps=3, sample_sizes=[10, 3], seed=0, progress=False)


def test_top_level_recovers_planted_clusters(mixture, levels):
    _, labels = mixture
    top = rows_to_level(levels, 2)
    # Same partition: each top cluster holds exactly one planted cluster.
    pairs = set(zip(top.tolist(), labels.tolist()))
    assert len(pairs) == len(SIZES) == len({t for t, _ in pairs}) == len({l for _, l in pairs})
    assert levels[0].centroids.shape == (24, 32) and levels[1].centroids.shape == (8, 32)
    assert levels[1].assignment.shape == (24,)


def test_balanced_sampling_gives_each_planted_cluster_its_share(mixture, levels):
    _, labels = mixture
    target = 200
    selected = hierarchical_sample([l.assignment for l in levels], [24, 8], target, seed=0)
    assert selected.size == target == np.unique(selected).size
    per_cluster = np.bincount(labels[selected], minlength=len(SIZES))
    cap = water_filling_reference(SIZES, target)  # 29: the six large clusters get 29 or 30, 15 and 8 all
    np.testing.assert_array_equal(per_cluster[-2:], [15, 8])
    assert set(per_cluster[:-2]) <= {cap, cap + 1}


def test_resampling_moves_centroids_from_the_dense_cluster_to_the_tail():
    # One huge cluster and 15 small ones. Plain k-means spends most centroids on the huge one;
    # resampling (same number of points per cluster) spreads them over the concepts.
    x, labels = long_tailed_mixture([6000] + [40] * 15, 16, spread=0.5, seed=1)

    def centroids_in_huge_cluster(steps):
        level = kmeans_level(x, 32, niter=10, resampling_steps=steps, sample_size=5, seed=0, init="kmeans++", progress=False)
        owner = labels[np.argmax(level.centroids @ x.T, axis=1)]
        return int(np.sum(owner == 0))

    plain, resampled = centroids_in_huge_cluster(0), centroids_in_huge_cluster(3)
    assert plain >= 10 and resampled <= plain // 2


def test_kmeans_level_resumes_from_checkpoint(tmp_path):
    x, _ = long_tailed_mixture([100, 100, 100], 8, seed=2)
    first = kmeans_level(x, 3, niter=5, resampling_steps=1, checkpoint_dir=tmp_path, progress=False)
    planted = np.eye(3, 8, dtype=np.float32)
    np.save(tmp_path / "step_001_centroids.npy", planted)  # pretend the last step had finished with these
    resumed = kmeans_level(x, 3, niter=5, resampling_steps=1, checkpoint_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(resumed.centroids, planted)
    assert first.assignment.shape == resumed.assignment.shape == (300,)


def test_kmeans_and_sample_stages_on_a_row_subset(tmp_path, mixture):
    x, labels = mixture
    np.save(tmp_path / "emb.npy", x)
    rows = np.flatnonzero(labels != 0)  # e.g. what dedup kept
    np.save(tmp_path / "rows.npy", rows)
    km = kmeans_stage(tmp_path / "emb.npy", tmp_path / "km", clusters=[12, 7], levels=2, rows_path=tmp_path / "rows.npy",
                      niter=10, resampling_steps=2, sample_sizes=[5, 2], progress=False)
    assert km.summary["rows"] == rows.size
    np.testing.assert_array_equal(np.load(tmp_path / "km" / "rows.npy"), rows)
    sample = sample_stage(tmp_path / "km", tmp_path / "s", target=100)
    selected = np.load(tmp_path / "s" / "selected.npy")
    assert sample.summary["selected"] == selected.size == 100
    assert np.isin(selected, rows).all() and (np.diff(selected) > 0).all()
    assert sample_stage(tmp_path / "km", tmp_path / "s", target=100).skipped


def test_kmeans_bad_input(tmp_path, mixture):
    x, _ = mixture
    np.save(tmp_path / "emb.npy", x[:50])
    with pytest.raises(CurationInputError, match="--levels 3 but --clusters lists 2"):
        kmeans_stage(tmp_path / "emb.npy", tmp_path / "o", clusters=[10, 2], levels=3)
    with pytest.raises(CurationInputError, match="asks for 60 clusters but only 50 rows"):
        kmeans_stage(tmp_path / "emb.npy", tmp_path / "o", clusters=[60, 2])
    with pytest.raises(CurationInputError, match="must not increase"):
        hierarchical_kmeans(x[:50], [5, 10])
    with pytest.raises(CurationInputError, match="no finished k-means run"):
        sample_stage(tmp_path / "nothing", tmp_path / "o", target=5)
    assert not (tmp_path / "o").exists()
