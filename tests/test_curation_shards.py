"""Embedding as a shard set: completeness checks, the explicit merge, job arrays (local processes, SLURM script)."""

import numpy as np
import pytest
from PIL import Image
from torch import nn

from data_curation.arrays import CurationInputError
from data_curation.cli import main
from data_curation.launch import LaunchOptions, ShardJobsFailed, sbatch_script
from data_curation.shards import check_shard_set, embed_sharded, merge_embed_shards, shard_device, shard_set_status
from data_curation.stages import embed_stage

OPTIONS = dict(backbone="thumbnail", weights=None, image_size=28, resize_size=32, part_size=2)


class KilledAfterOneBatch(nn.Module):
    """Backbone that dies on its second batch, like a job killed mid-shard."""

    embed_dim = 3

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            raise KeyboardInterrupt("killed")
        return x.mean(dim=(2, 3))


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "9_broken.png").write_bytes(b"junk")
    return root


def embed_shards(images, out, count, indices, **overrides):
    for index in indices:
        embed_stage(images, out, shard=(index, count), progress=False, **{**OPTIONS, **overrides})


def test_merge_names_missing_and_incomplete_shards_before_work(images, tmp_path):
    out = tmp_path / "out"
    embed_shards(images, out, 5, [0, 2])
    with pytest.raises(KeyboardInterrupt):
        embed_stage(images, out, shard=(3, 5), model=KilledAfterOneBatch(), batch_size=1, progress=False,
                    **{k: v for k, v in OPTIONS.items() if k not in ("backbone", "weights")})
    assert shard_set_status(out, 5) == ([0, 2], [3], [1, 4])
    with pytest.raises(CurationInputError, match=r"missing shards 1, 4 \(no folder\); incomplete shards 3 "):
        merge_embed_shards(out, 5)
    assert main(["embed-merge", "--output-dir", str(out)]) == 2  # the CLI says the same, exit 2
    assert not (out / "embeddings.npy").exists()


def test_merge_refuses_shards_that_disagree(images, tmp_path):
    out = tmp_path / "out"
    embed_shards(images, out, 3, [0, 1])
    embed_shards(images, out, 3, [2], dtype="float16")
    with pytest.raises(CurationInputError, match=r"disagree on 'dtype' \(shards 0-1: \"float32\"; shards 2: \"float16\"\)"):
        check_shard_set(out, 3)
    other = tmp_path / "other"
    other.mkdir()
    for path in sorted(images.iterdir())[:6]:
        (other / path.name).write_bytes(path.read_bytes())
    embed_shards(images, tmp_path / "mixed", 3, [0, 1])
    embed_shards(other, tmp_path / "mixed", 3, [2])
    with pytest.raises(CurationInputError, match="disagree on another image list"):
        merge_embed_shards(tmp_path / "mixed")
    embed_shards(images, tmp_path / "mixed", 4, [0])
    with pytest.raises(CurationInputError, match=r"shard sets of several sizes \[3, 4\]: pass --shards N"):
        merge_embed_shards(tmp_path / "mixed")


def test_merge_equals_one_run_and_is_idempotent(images, tmp_path):
    whole = tmp_path / "whole"
    embed_stage(images, whole, progress=False, **OPTIONS)
    out = tmp_path / "out"
    embed_shards(images, out, 4, [3, 1, 0, 2])
    first = merge_embed_shards(out)
    assert not first.skipped and first.summary["embedded"] == 9 and first.summary["errors"] == 1
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(whole / "embeddings.npy"))
    for name in ("paths.txt", "errors.txt"):
        assert (out / name).read_text() == (whole / name).read_text()
    assert merge_embed_shards(out, 4).skipped
    # a shard embedded again (new files; part_size does not change the rows) makes the merge run again
    embed_shards(images, out, 4, [1], part_size=1)
    again = merge_embed_shards(out, 4)
    assert not again.skipped
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(whole / "embeddings.npy"))


def test_bad_shard_counts_and_options(images, tmp_path):
    with pytest.raises(CurationInputError, match="more shards than the 10 images"):
        embed_sharded(images, tmp_path / "o", shards=11, **OPTIONS)
    with pytest.raises(CurationInputError, match="--shards must be >= 1"):
        merge_embed_shards(tmp_path / "o", 0)
    with pytest.raises(CurationInputError, match="no shard folders"):
        merge_embed_shards(tmp_path / "o")
    with pytest.raises(CurationInputError, match="launcher must be one of"):
        embed_sharded(images, tmp_path / "o", shards=2, launch=LaunchOptions(launcher="pbs"), **OPTIONS)
    with pytest.raises(CurationInputError, match="--slurm 'mail-type=': expected KEY=VALUE"):
        embed_sharded(images, tmp_path / "o", shards=2, launch=LaunchOptions(launcher="slurm", slurm=("mail-type=",)), **OPTIONS)
    assert main(["embed", "--images", str(images), "--output-dir", str(tmp_path / "o"), "--shard", "0/2",
                 "--shards", "2"]) == 2


def test_slurm_dry_run_prints_the_job_array(images, tmp_path, capsys):
    out = tmp_path / "out"
    embed_shards(images, out, 4, [1])  # finished shards are not submitted again
    assert main(["embed", "--images", str(images), "--output-dir", str(out), "--backbone", "thumbnail", "--shards", "4",
                 "--launcher", "slurm", "--partition", "learn", "--parallel", "2", "--gpus-per-job", "1",
                 "--slurm", "mail-type=END", "--setup", "module load cuda", "--dry-run"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=learn", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --mail-type=END", "module load cuda", "submitit.core._submit"):
        assert line in script
    assert not (out / "submitit").exists()
    assert "--array=0-9" in sbatch_script(LaunchOptions(launcher="slurm"), 10, tmp_path, "x")


def test_shard_device_spreads_gpus():
    assert [shard_device(i, "auto", 4) for i in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert shard_device(3, "auto", 1) == "auto" and shard_device(3, "cpu", 8) == "cpu"


@pytest.mark.slow
def test_local_job_array_embeds_merges_and_reruns_nothing(images, tmp_path):
    whole = tmp_path / "whole"
    embed_stage(images, whole, progress=False, **OPTIONS)
    out = tmp_path / "out"
    args = ["-q", "embed", "--images", str(images), "--output-dir", str(out), "--backbone", "thumbnail",
            "--weights", "random", "--image-size", "28", "--resize-size", "32", "--part-size", "2", "--shards", "3",
            "--launcher", "local"]
    assert main(args) == 0
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(whole / "embeddings.npy"))
    assert (out / "paths.txt").read_text() == (whole / "paths.txt").read_text()
    logs = sorted((out / "submitit").glob("*_log.out"))
    assert len(logs) == 3
    assert main(args) == 0  # every shard finished: no process started, merge up to date
    assert sorted((out / "submitit").glob("*_log.out")) == logs


@pytest.mark.slow
def test_a_failing_shard_job_is_named(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "b.png").write_bytes(b"junk")  # shard 1 of 2: only an undecodable image
    with pytest.raises(ShardJobsFailed, match=r"1 shard job\(s\) failed: \[1\]") as caught:
        embed_sharded(root, tmp_path / "out", shards=2, **OPTIONS)
    assert "none of the images could be decoded" in str(caught.value) and "_log.err" in str(caught.value)
    assert shard_set_status(tmp_path / "out", 2)[0] == [0]  # the good shard is kept for a rerun


@pytest.mark.slow
def test_run_config_embeds_in_shards_and_searches_index_shards(images, tmp_path):
    from data_curation.config import load_config
    from data_curation.pipeline import run_pipeline

    def run(name, *overrides):
        cfg = load_config("default", [f"embed.images={images}", f"output_dir={tmp_path / name}", "embed.backbone=thumbnail",
                                      "embed.image_size=28", "embed.resize_size=32", "kmeans.enabled=false",
                                      "self_dedup.k=3", "progress=false", *overrides])
        return run_pipeline(cfg, report=lambda line: None)

    sharded = run("sharded", "embed.shards=3", "self_dedup.index_shards=2")
    plain = run("plain")
    assert sharded["stages"]["embed"]["shards"] == 3
    for name in ("embed/embeddings.npy", "dedup/keep.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "sharded" / name), np.load(tmp_path / "plain" / name))
    assert (tmp_path / "sharded" / "manifest.txt").read_text() == (tmp_path / "plain" / "manifest.txt").read_text()
    assert plain["stages"]["embed"]["embedded"] == 9
