"""Distributed hierarchical k-means: 2 gloo processes on CPU give the same clusters as 1 process."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from data_curation.distributed_kmeans import distributed_hierarchical_kmeans, splitmix_uniform
from data_curation.embed import shard_slice
from data_curation.synthetic import long_tailed_mixture
from gloo_ranks import run_ranks

CLUSTERS = [24, 6]


def pool():
    x, _ = long_tailed_mixture([900, 400, 200, 100, 60, 30, 20, 10], 16, spread=0.6, seed=3)
    return x


def kmeans_on_rank(points, world, strategy, dtype):
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        local = points[shard_slice(points.shape[0], (rank, world))]
        levels = distributed_hierarchical_kmeans(local, CLUSTERS, niter=6, resampling_steps=2, sample_sizes=[5, 2],
                                                 strategy=strategy, seed=7, dtype=dtype, process_group=dist.group.WORLD)
        return [(level.centroids, level.assignment, level.distances) for level in levels]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy,dtype", [("closest", "float64"), ("random", "float32")])
def test_two_gloo_processes_give_the_same_clusters_as_one(tmp_path, strategy, dtype):
    points = pool()
    single = distributed_hierarchical_kmeans(points, CLUSTERS, niter=6, resampling_steps=2, sample_sizes=[5, 2],
                                             strategy=strategy, seed=7, dtype=dtype)
    ranks = run_ranks(kmeans_on_rank, 2, tmp_path / "ranks", points, 2, strategy, dtype)
    level1 = np.concatenate([r[0][1] for r in ranks])  # each rank assigns its own rows
    np.testing.assert_array_equal(level1, single[0].assignment)
    np.testing.assert_allclose(np.concatenate([r[0][2] for r in ranks]), single[0].distances, rtol=1e-4, atol=1e-6)
    for rank in ranks:
        np.testing.assert_allclose(rank[0][0], single[0].centroids, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(rank[1][1], single[1].assignment)
    # A real clustering: every point is at its nearest level-1 centroid, every cluster is used.
    d = ((points[:, None, :] - single[0].centroids[None]) ** 2).sum(-1)
    assert (d.argmin(1) == single[0].assignment).mean() > 0.999
    assert np.unique(single[0].assignment).size == CLUSTERS[0]


def test_random_keys_depend_only_on_seed_step_and_row():
    rows = np.arange(1000)
    keys = splitmix_uniform(3, 1, rows)
    np.testing.assert_array_equal(splitmix_uniform(3, 1, rows[500:]), keys[500:])
    assert 0 <= keys.min() and keys.max() < 1 and abs(keys.mean() - 0.5) < 0.05
    assert not np.array_equal(keys, splitmix_uniform(3, 2, rows))


def kmeans_command(args):
    from data_curation.cli import main

    assert main(args) == 0


def test_kmeans_command_distributed_writes_the_same_files_for_1_and_2_processes(tmp_path):
    points = pool()
    np.save(tmp_path / "embeddings.npy", points)
    np.save(tmp_path / "rows.npy", np.arange(0, points.shape[0], 2))
    common = ["-q", "kmeans", "--distributed", "--embeddings", str(tmp_path / "embeddings.npy"), "--rows",
              str(tmp_path / "rows.npy"), "--clusters", "12,3", "--niter", "5", "--resampling-steps", "1",
              "--sample-size", "4", "--device", "cpu"]
    kmeans_command(common + ["--output-dir", str(tmp_path / "one")])
    run_ranks(kmeans_command, 2, tmp_path / "ranks", common + ["--output-dir", str(tmp_path / "two")])
    for name in ["rows.npy", "level1_assignment.npy", "level2_assignment.npy"]:
        np.testing.assert_array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name))
    np.testing.assert_allclose(np.load(tmp_path / "one" / "level1_centroids.npy"),
                               np.load(tmp_path / "two" / "level1_centroids.npy"), rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "two" / ".work").exists()
    from data_curation.cli import main

    assert main(common + ["--output-dir", str(tmp_path / "two"), "--strategy", "closest"]) == 0  # up to date
    assert main(["-q", "sample", "--clusters-dir", str(tmp_path / "two"), "--target", "100",
                 "--output-dir", str(tmp_path / "sample")]) == 0
    selected = np.load(tmp_path / "sample" / "selected.npy")
    assert selected.size == 100 and np.isin(selected, np.load(tmp_path / "rows.npy")).all()


def test_lloyd_accumulates_in_chunks_with_the_same_result():
    """The centroid sums are accumulated chunk by chunk (no float64 copy of the whole shard);
    on CPU the row order, hence every float64 sum, is unchanged: bit-identical centroids."""
    from data_curation.distributed_kmeans import lloyd, make_shard

    points = torch.as_tensor(pool())
    start = points[:24].double().numpy()
    shard = make_shard(points.shape[0], torch.device("cpu"))
    given = start.copy()
    whole = lloyd(points, start, 4, shard, chunk_rows=points.shape[0])
    np.testing.assert_array_equal(start, given)  # the caller's array is not overwritten
    chunked = lloyd(points, start, 4, shard, chunk_rows=97)
    np.testing.assert_array_equal(chunked, whole)
    assert not np.allclose(whole, start)  # the iterations moved the centroids
