"""Cluster counts relative to the number of rows clustered ("0.01x")."""

import json

import numpy as np
import pytest

from data_curation.arrays import CurationInputError
from data_curation.cli import main
from data_curation.cluster_counts import parse_cluster_counts, resolve_cluster_counts
from data_curation.config import load_config
from data_curation.pipeline import run_pipeline
from data_curation.stages import kmeans_stage
from data_curation.synthetic import long_tailed_mixture


def test_parse_and_resolve():
    assert parse_cluster_counts([100, "10", "0.01x", " 0.5X ", "1e-3x"]) == [100, 10, "0.01x", "0.5x", "1e-3x"]
    assert resolve_cluster_counts(["0.01x", "0.001x", "0.0001x"], 1_000_000) == [10000, 1000, 100]
    assert resolve_cluster_counts(["0.3x", 4], 10) == [3, 4]
    assert resolve_cluster_counts(["0.25x"], 10) == [3]  # 2.5 rounds half up
    assert resolve_cluster_counts(["1e-9x"], 1000) == [1]  # never 0 clusters
    assert resolve_cluster_counts(["1x"], 7) == [7]


@pytest.mark.parametrize("bad,message", [
    ("0x", r"must lie in \(0, 1\]"), ("1.5x", r"must lie in \(0, 1\]"), ("0", ">= 1"), ("-3", "neither"),
    ("1.5", "neither"), ("ten", "neither"), ("x", "neither"), (True, "positive integer"),
])
def test_bad_counts_name_the_value(bad, message):
    with pytest.raises(CurationInputError, match=message):
        parse_cluster_counts([bad])
    with pytest.raises(CurationInputError, match="at least one cluster count"):
        parse_cluster_counts([])


@pytest.fixture
def pool(tmp_path):
    x, _ = long_tailed_mixture([60, 40, 30, 20, 10], 16, spread=0.3, seed=0)
    path = tmp_path / "emb" / "embeddings.npy"
    path.parent.mkdir()
    np.save(path, x)
    (path.parent / "paths.txt").write_text("".join(f"/img/{i}.png\n" for i in range(x.shape[0])))
    return path


def test_relative_counts_are_the_same_run_as_their_absolute_counts(pool, tmp_path):
    rows = np.arange(0, 160, dtype=np.int64)  # 160 of the 160 rows, via --rows
    np.save(tmp_path / "rows.npy", rows[::2])  # 80 rows clustered
    relative = kmeans_stage(pool, tmp_path / "km", clusters=["0.1x", "0.025x"], rows_path=tmp_path / "rows.npy",
                            niter=5, progress=False)
    assert relative.summary["clusters"] == "8,2"
    assert json.loads((tmp_path / "km" / "levels.json").read_text())["clusters"] == [8, 2]
    assert np.load(tmp_path / "km" / "level1_centroids.npy").shape[0] == 8
    assert kmeans_stage(pool, tmp_path / "km", clusters=[8, 2], rows_path=tmp_path / "rows.npy", niter=5,
                        progress=False).skipped
    with pytest.raises(CurationInputError, match="must not increase"):
        kmeans_stage(pool, tmp_path / "km2", clusters=["0.01x", 5], niter=5, progress=False)


def test_cli_and_config_accept_relative_counts(pool, tmp_path, capsys):
    assert main(["-q", "kmeans", "--embeddings", str(pool), "--clusters", "0.05x,2", "--niter", "3",
                 "--resampling-steps", "0", "--output-dir", str(tmp_path / "km")]) == 0
    assert "clusters=8,2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["kmeans", "--embeddings", str(pool), "--clusters", "2x", "--output-dir", str(tmp_path / "o")])
    assert "fraction of rows must lie in (0, 1]" in capsys.readouterr().err
    cfg = load_config("default", [f"embed.embeddings={pool}", f"output_dir={tmp_path / 'run'}", "kmeans.clusters=[0.05x,2]",
                                  "kmeans.niter=3", "kmeans.resampling_steps=0", "sampling.target=20", "progress=false",
                                  "self_dedup.enabled=false"])
    summary = run_pipeline(cfg, report=lambda line: None)
    assert summary["stages"]["kmeans"]["clusters"] == "8,2"  # 5 % of the 160 rows
    bad = load_config("default", [f"embed.embeddings={pool}", f"output_dir={tmp_path / 'bad'}", "kmeans.clusters=[1.5x]"])
    with pytest.raises(CurationInputError, match=r"'1.5x'.*\(0, 1\]"):
        run_pipeline(bad, report=lambda line: None)
    assert not (tmp_path / "bad" / "dedup").exists()  # refused before any stage ran
