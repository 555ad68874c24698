"""`dinov2-curate` commands end to end on planted embeddings; config loading; manifest."""

import subprocess
import sys

import numpy as np
import pytest

from data_curation.arrays import CurationInputError
from data_curation.cli import build_parser, main
from data_curation.config import load_config, packaged_config
from data_curation.synthetic import long_tailed_mixture, planted_pool

COMMANDS = ["hash-dedup", "filter", "blur-faces", "embed", "embed-merge", "dedup", "retrieve", "kmeans", "sample", "manifest", "run"]


@pytest.fixture
def pool_dir(tmp_path):
    """Planted pool + paths.txt, as `embed` would leave them."""
    planted = planted_pool(600, 32, [4, 3, 2], chain_lengths=[3], seed=1)
    np.save(tmp_path / "embeddings.npy", planted.embeddings)
    (tmp_path / "paths.txt").write_text("".join(f"/data/img_{i:04d}.jpg\n" for i in range(planted.embeddings.shape[0])))
    return tmp_path, planted


def test_every_command_has_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: dinov2-curate {command}" in capsys.readouterr().out


def test_console_entry_runs_as_a_module():
    completed = subprocess.run([sys.executable, "-m", "data_curation.cli", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0 and "dedup" in completed.stdout


def test_chain_of_commands(pool_dir, capsys):
    d, planted = pool_dir
    emb = str(d / "embeddings.npy")
    connected = ["--rule", "connected"]
    assert main(["-q", "dedup", "--embeddings", emb, "--k", "5", "--threshold", "0.9", "--output-dir", str(d / "dedup"), *connected]) == 0
    keep = np.load(d / "dedup" / "keep.npy")
    assert keep.size == np.unique(planted.components).size
    assert main(["-q", "dedup", "--embeddings", emb, "--k", "5", "--threshold", "0.9", "--output-dir", str(d / "dedup"), *connected]) == 0
    assert "up to date, nothing to do" in capsys.readouterr().out

    np.save(d / "eval.npy", planted.embeddings[[10, 20]])
    assert main(["-q", "dedup", "--embeddings", emb, "--against", str(d / "eval.npy"), "--threshold", "0.9",
                 "--output-dir", str(d / "rel")]) == 0
    rel_keep = np.load(d / "rel" / "keep.npy")
    assert 10 not in rel_keep and 20 not in rel_keep and rel_keep.size >= planted.embeddings.shape[0] - 10

    np.save(d / "queries.npy", planted.embeddings[:3])
    assert main(["-q", "retrieve", "--embeddings", emb, "--queries", str(d / "queries.npy"), "--k", "4",
                 "--output-dir", str(d / "ret")]) == 0
    np.testing.assert_array_equal(np.load(d / "ret" / "neighbors.npy")[:, 0], [0, 1, 2])

    assert main(["-q", "kmeans", "--embeddings", emb, "--levels", "2", "--clusters", "12,4", "--rows", str(d / "dedup" / "keep.npy"),
                 "--resampling-steps", "1", "--niter", "5", "--output-dir", str(d / "km")]) == 0
    assert main(["-q", "sample", "--clusters-dir", str(d / "km"), "--target", "100", "--output-dir", str(d / "s")]) == 0
    selected = np.load(d / "s" / "selected.npy")
    assert selected.size == 100 and np.isin(selected, keep).all()

    manifest = d / "manifest.txt"
    assert main(["manifest", "--paths", str(d / "paths.txt"), "--select", str(d / "s" / "selected.npy"),
                 "--select", str(d / "rel" / "keep.npy"), "--output", str(manifest)]) == 0
    lines = manifest.read_text().splitlines()
    expected = np.intersect1d(selected, rel_keep)
    assert lines == [f"/data/img_{i:04d}.jpg" for i in expected]


def test_bad_input_exits_non_zero_with_one_clear_line(pool_dir, capsys):
    d, _ = pool_dir
    np.save(d / "flat.npy", np.zeros(10, dtype=np.float32))
    code = main(["dedup", "--embeddings", str(d / "flat.npy"), "--k", "2", "--threshold", "0.9", "--output-dir", str(d / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "dinov2-curate dedup: error: embeddings" in err and "2-D float array" in err
    code = main(["dedup", "--embeddings", str(d / "missing.npy"), "--k", "2", "--threshold", "0.9", "--output-dir", str(d / "o")])
    assert code == 2 and "not found" in capsys.readouterr().err
    code = main(["dedup", "--embeddings", str(d / "embeddings.npy"), "--threshold", "0.9", "--output-dir", str(d / "o")])
    assert code == 2 and "either --k K" in capsys.readouterr().err
    code = main(["dedup", "--embeddings", str(d / "embeddings.npy"), "--k", "3", "--threshold", "0.9", "--factory", "Bogus",
                 "--output-dir", str(d / "o")])
    assert code == 2 and "invalid FAISS factory string 'Bogus'" in capsys.readouterr().err
    code = main(["manifest", "--paths", str(d / "paths.txt"), "--select", str(d / "embeddings.npy"), "--output", str(d / "o" / "m.txt")])
    assert code == 2 and "1-D integer array" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "--images", str(d), "--output-dir", str(d / "o"), "--shard", "3/2"])
    assert exit_info.value.code == 2
    assert not (d / "o").exists()


def test_config_is_strict_and_suggests_the_closest_key(tmp_path):
    assert packaged_config("default").is_file()
    cfg = load_config("default")
    assert cfg.index.factory == "Flat" and list(cfg.kmeans.clusters) == [100, 10]
    bad = tmp_path / "bad.yaml"
    bad.write_text("self_dedup:\n  treshold: 0.95\n")
    with pytest.raises(CurationInputError, match=r"unknown config key 'self_dedup.treshold'.*did you mean 'self_dedup.threshold'"):
        load_config(bad)
    with pytest.raises(CurationInputError, match=r"unknown config key 'kmeans.cluster'.*'kmeans.clusters'"):
        load_config("default", ["kmeans.cluster=[4,2]"])
    with pytest.raises(CurationInputError, match="unknown config key 'indx'.*'index'"):
        load_config(None, ["indx.factory=HNSW32"])
    with pytest.raises(CurationInputError, match="invalid value"):
        load_config(None, ["self_dedup.k=many"])
    with pytest.raises(CurationInputError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    # The training config's loader: ranges next to the keys, YAML errors with file and line.
    with pytest.raises(CurationInputError, match=r"self_dedup.threshold=1.5 is out of range: must be in \[-1, 1\]"):
        load_config("default", ["self_dedup.threshold=1.5"])
    with pytest.raises(CurationInputError, match=r"embed.batch_size=0 is out of range: must be >= 1"):
        load_config(None, ["embed.batch_size=0"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("kmeans:\n  clusters: [4, 2\n")
    with pytest.raises(CurationInputError, match=rf"invalid YAML in {broken} at line 3"):
        load_config(broken)
    cfg.index.factory = "HNSW32"  # a loaded config stays editable (IndexOptions is a frozen dataclass)


# Every key of the curation schema with a closed set of values, with that set written out by hand.
CHOICE_KEYS = {
    "hash_dedup.rule": "representative, connected",
    "self_dedup.rule": "representative, connected",
    "embed.dtype": "float32, float16",
    "embed.launcher": "local, slurm",
    "index.device": "auto, cpu, gpu",
    "kmeans.strategy": "closest, random",
    "kmeans.init": r"auto, kmeans\+\+, random",
    "sampling.strategy": "closest, random",
}


@pytest.mark.parametrize("key", sorted(CHOICE_KEYS))
def test_a_value_outside_a_choice_names_the_key_and_the_valid_values(key, tmp_path):
    expected = rf"{key}: Invalid value 'bogus', expected one of \[{CHOICE_KEYS[key]}\]"
    with pytest.raises(CurationInputError, match=rf"override '{key}=bogus': {expected}"):
        load_config("default", [f"{key}=bogus"])
    section, name = key.split(".")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"{section}:\n  {name}: bogus\n")
    with pytest.raises(CurationInputError, match=rf"invalid value in {bad}: {expected}"):
        load_config(bad)


def test_choices_load_as_their_plain_strings():
    cfg = load_config(None, ["kmeans.init=kmeans++", "self_dedup.rule=connected", "index.device=cpu"])
    assert cfg.kmeans.init == "kmeans++" and cfg.self_dedup.rule == "connected" and cfg.index.device == "cpu"
    assert f"{cfg.kmeans.init}" == "kmeans++" and cfg.sampling.strategy == "random"  # the defaults are members too


def test_cli_choices_are_the_config_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["kmeans", "--embeddings", "e.npy", "--clusters", "4", "--output-dir", "o", "--init", "kmeans+"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.replace('"', "").replace("'", "")  # argparse quotes choices on some Pythons only
    assert "argument --init: invalid choice: kmeans+ (choose from auto, kmeans++, random)" in err


def test_a_python_caller_gets_the_same_kind_of_error():
    from data_curation.groups import group_rows, pair_graph
    from data_curation.sampling import hierarchical_sample

    graph = pair_graph(np.array([0]), np.array([1]), np.array([0.5]), 3)
    with pytest.raises(CurationInputError, match="group rule must be one of representative, connected, got 'chained'"):
        group_rows(graph, np.arange(3), "chained")
    with pytest.raises(CurationInputError, match="sampling strategy must be one of closest, random, got 'nearest'"):
        hierarchical_sample([np.zeros(4, dtype=np.int64)], [1], 2, strategy="nearest")


def test_run_from_config_is_idempotent(pool_dir, capsys):
    d, planted = pool_dir
    x, labels = long_tailed_mixture([300, 100, 50], 32, seed=0)
    np.save(d / "embeddings.npy", np.concatenate([planted.embeddings, x]))
    (d / "paths.txt").write_text("".join(f"/data/img_{i:04d}.jpg\n" for i in range(planted.embeddings.shape[0] + x.shape[0])))
    np.save(d / "eval.npy", planted.embeddings[:5])
    config = d / "curation.yaml"
    config.write_text(
        f"output_dir: {d / 'run'}\nprogress: false\n"
        f"embed:\n  embeddings: {d / 'embeddings.npy'}\n"
        "self_dedup:\n  k: 5\n"
        f"relative_dedup:\n  enabled: true\n  against: [{d / 'eval.npy'}]\n"
        "kmeans:\n  clusters: [16, 4]\n  niter: 5\n  resampling_steps: 1\n"
        "sampling:\n  target: 200\n"
    )
    assert main(["-q", "run", "--config", str(config)]) == 0
    first = capsys.readouterr().out
    manifest = (d / "run" / "manifest.txt").read_text().splitlines()
    assert len(manifest) == 200 and len(set(manifest)) == 200
    assert not set(manifest) & {f"/data/img_{i:04d}.jpg" for i in range(5)}  # evaluation images never leak
    assert "up to date" not in first
    assert main(["-q", "run", "--config", str(config)]) == 0
    second = capsys.readouterr().out
    assert second.count("up to date, nothing to do") == 5  # dedup, dedup-relative, kmeans, sample, manifest
    assert main(["-q", "run", "--config", str(config), "sampling.target=150"]) == 0
    assert len((d / "run" / "manifest.txt").read_text().splitlines()) == 150


def test_parser_lists_all_commands():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert sorted(choices) == sorted(COMMANDS)
