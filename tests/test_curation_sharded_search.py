"""Self-dedup search over index shards, merged: the same pairs as one index."""

import json

import numpy as np
import pytest

from data_curation.arrays import CurationInputError
from data_curation.cli import main
from data_curation.dedup import self_dedup
from data_curation.index import IndexOptions, search
from data_curation.sharded_search import merge_index_shards, search_index_shard, sharded_self_knn
from data_curation.stages import self_dedup_stage
from data_curation.synthetic import planted_pool

THRESHOLD = 0.9


@pytest.fixture(scope="module")
def planted():
    # 1,991 rows: groups and chains land in different thirds of the pool, so pairs cross shards.
    return planted_pool(1960, 48, [6, 5, 4, 3, 2, 2, 2], chain_lengths=[4, 3], seed=3)


@pytest.fixture
def pool_file(planted, tmp_path):
    path = tmp_path / "emb" / "embeddings.npy"
    path.parent.mkdir()
    np.save(path, planted.embeddings)
    return path


def linked_pairs(similarities, ids, threshold):
    """Unordered pairs (i, j), i != j, with cosine >= threshold among each row's neighbours."""
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    cols, sims = ids.reshape(-1), similarities.reshape(-1)
    keep = (cols >= 0) & (cols != rows) & (sims >= threshold)
    return {(int(min(a, b)), int(max(a, b))) for a, b in zip(rows[keep], cols[keep])}


def brute_force_topk(x, k):
    sims = x @ x.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def test_merged_shards_are_the_exact_top_k(planted, tmp_path):
    x = planted.embeddings[:300]
    k = 7
    for count in (1, 2, 5):
        sims, ids = sharded_self_knn(None, x, k, IndexOptions(chunk_rows=64), count, tmp_path / f"w{count}", progress=False)
        ref_sims, ref_ids = brute_force_topk(x.astype(np.float64), k)
        np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
        # ids agree wherever the similarity is not tied with another candidate
        untied = np.abs(np.diff(ref_sims, axis=1, append=-np.inf)) > 1e-5
        np.testing.assert_array_equal(ids[untied], ref_ids[untied])


def test_a_shard_smaller_than_k_pads_and_merges(planted, tmp_path):
    x = planted.embeddings[:12]
    sims, ids = sharded_self_knn(None, x, 8, IndexOptions(), 4, tmp_path, progress=False)  # 3 rows per shard
    ref_sims, _ = brute_force_topk(x.astype(np.float64), 8)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (ids >= 0).all()


@pytest.mark.parametrize("rule", ["representative", "connected"])
def test_one_vs_three_index_shards_same_pairs_and_groups(planted, rule, tmp_path):
    x = planted.embeddings
    one = self_dedup(x, 8, THRESHOLD, index=IndexOptions(), progress=False, rule=rule)
    three = self_dedup(x, 8, THRESHOLD, index=IndexOptions(), progress=False, rule=rule,
                       knn=lambda kk: sharded_self_knn(None, x, kk, IndexOptions(), 3, tmp_path, progress=False))
    one_index = search(IndexOptions().build(x, progress=False), x, 9, progress=False)
    three_shards = sharded_self_knn(None, x, 9, IndexOptions(), 3, tmp_path, progress=False)
    expected = linked_pairs(*brute_force_topk(x.astype(np.float64), 9), THRESHOLD)
    assert len(expected) > 20  # the planted groups and chains
    assert linked_pairs(*three_shards, THRESHOLD) == linked_pairs(*one_index, THRESHOLD) == expected
    np.testing.assert_array_equal(three.components, one.components)
    np.testing.assert_array_equal(three.keep, one.keep)
    assert three.num_edges == one.num_edges
    if rule == "connected":
        np.testing.assert_array_equal(three.components, planted.components)


def test_stage_one_vs_three_shards_and_own_job_array(pool_file, tmp_path):
    one = self_dedup_stage(pool_file, tmp_path / "one", k=8, threshold=THRESHOLD, progress=False)
    three = self_dedup_stage(pool_file, tmp_path / "three", k=8, threshold=THRESHOLD, progress=False, index_shards=3)
    for name in ("components.npy", "keep.npy", "representative.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "three" / name), np.load(tmp_path / "one" / name))
    assert one.summary["edges"] == three.summary["edges"]
    marker = json.loads((tmp_path / "three" / ".dedup.done.json").read_text())
    assert marker["params"]["index_shards"] == 3 and "index_shards" not in json.loads(
        (tmp_path / "one" / ".dedup.done.json").read_text())["params"]
    assert self_dedup_stage(pool_file, tmp_path / "three", k=8, threshold=THRESHOLD, progress=False, index_shards=3).skipped

    # your own array: one shard per command, then the plain command merges without searching again
    out = tmp_path / "own"
    args = ["-q", "dedup", "--embeddings", str(pool_file), "--k", "8", "--threshold", str(THRESHOLD),
            "--output-dir", str(out), "--index-shards", "3"]
    for shard in (2, 0):
        assert main(args + ["--search-shard", str(shard)]) == 0
    assert not (out / "keep.npy").exists()
    with pytest.raises(CurationInputError, match=r"index shards \[1\] of 3 have not finished"):
        merge_index_shards(next((out / ".work").iterdir()), 3, 1991, 9, 4096)
    assert main(args + ["--search-shard", "1"]) == 0
    assert main(args) == 0
    np.testing.assert_array_equal(np.load(out / "keep.npy"), np.load(tmp_path / "one" / "keep.npy"))
    assert not (out / ".work").exists()


def test_sharded_ivf_reports_recall_from_the_merged_results(pool_file, tmp_path):
    index = IndexOptions(factory="IVF8,Flat", search_params="nprobe=8", recall_sample=200)  # all lists probed
    result = self_dedup_stage(pool_file, tmp_path / "ivf", k=8, threshold=THRESHOLD, progress=False, index=index,
                              index_shards=2)
    recall = json.loads((tmp_path / "ivf" / "recall.json").read_text())
    assert recall["queries"] == 200 and recall["recall_at_k"] == pytest.approx(1.0)
    assert result.summary["pair_recall"] == pytest.approx(1.0)


def test_bad_shard_options_fail_before_work(pool_file, tmp_path, capsys):
    with pytest.raises(CurationInputError, match=r"--index-shards must be an integer in \[1, 1991\]"):
        self_dedup_stage(pool_file, tmp_path / "x", k=8, threshold=THRESHOLD, index_shards=1992, progress=False)
    with pytest.raises(CurationInputError, match="--search-shard 3: need 0 <= s < --index-shards 3"):
        self_dedup_stage(pool_file, tmp_path / "x", k=8, threshold=THRESHOLD, index_shards=3, only_shard=3, progress=False)
    assert main(["dedup", "--embeddings", str(pool_file), "--against", str(pool_file), "--threshold", "0.9",
                 "--output-dir", str(tmp_path / "r"), "--index-shards", "2"]) == 2
    assert "are for self-dedup" in capsys.readouterr().err


def test_search_index_shard_resumes(planted, tmp_path):
    x = planted.embeddings[:200]
    folder = search_index_shard(x, 1, 2, 5, IndexOptions(chunk_rows=50), tmp_path, progress=False)
    first = np.load(folder / "ids.npy")
    assert first.min() >= 0 and first.max() >= 100 and (first[:, 0] >= 100).all()  # ids of block 1 = rows 100-199
    mtime = (folder / "ids.npy").stat().st_mtime_ns
    search_index_shard(x, 1, 2, 5, IndexOptions(chunk_rows=50), tmp_path, progress=False)
    assert (folder / "ids.npy").stat().st_mtime_ns == mtime  # done: not searched again


@pytest.mark.slow
def test_index_shards_as_two_local_processes(pool_file, tmp_path):
    base = ["-q", "dedup", "--embeddings", str(pool_file), "--k", "8", "--threshold", str(THRESHOLD)]
    assert main(base + ["--output-dir", str(tmp_path / "one")]) == 0
    assert main(base + ["--output-dir", str(tmp_path / "two"), "--index-shards", "2", "--launcher", "local"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "keep.npy"), np.load(tmp_path / "one" / "keep.npy"))
    assert len(list((tmp_path / "two" / "submitit").glob("*_0_log.out"))) == 2
