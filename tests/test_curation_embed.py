"""`embed`: image listing, sharding, corrupt files, resume, and the real hub backbone."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data_curation.arrays import CurationInputError
from data_curation.embed import list_images, load_model, make_transform, parse_shard, shard_slice
from data_curation.shards import merge_embed_shards
from data_curation.stages import embed_stage


class MeanColourBackbone(nn.Module):
    """Stand-in backbone: per-channel means and a fixed random projection of a 4x4 pooling."""

    embed_dim = 51

    def __init__(self, fail_after=None):
        super().__init__()
        self.proj = nn.Linear(48, 48)
        generator = torch.Generator().manual_seed(0)
        torch.nn.init.normal_(self.proj.weight, generator=generator)
        torch.nn.init.normal_(self.proj.bias, generator=generator)
        self.calls = 0
        self.fail_after = fail_after

    def forward(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        pooled = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.cat([x.mean(dim=(2, 3)), self.proj(pooled)], dim=1)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    names = ["a.png", "b.jpg", "sub/c.png", "sub/deeper/d.jpeg", "sub/e.png", "f.png"]
    for name in names:
        size = tuple(int(s) for s in rng.integers(40, 90, size=2))
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    (root / "sub" / "broken.png").write_bytes(b"not a png at all")
    (root / "notes.txt").write_text("not an image")
    return root


def expected_features(model, path, image_size=28, resize_size=32):
    with Image.open(path) as image:
        x = make_transform(image_size, resize_size)(image.convert("RGB"))[None]
    with torch.no_grad():
        f = model(x)[0]
    return (f / f.norm()).numpy()


def test_list_images_from_folder_and_list_file(image_folder, tmp_path):
    paths = list_images(image_folder)
    assert [p.split("images/")[1] for p in paths] == sorted(
        ["a.png", "b.jpg", "f.png", "sub/broken.png", "sub/c.png", "sub/deeper/d.jpeg", "sub/e.png"]
    )
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nimages/a.png\n\n" + str(image_folder / "f.png") + "\n")
    assert list_images(listing) == [str(image_folder / "a.png"), str(image_folder / "f.png")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurationInputError, match="no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(CurationInputError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_shards_partition_the_list():
    for n in (1, 3, 7):
        blocks = [list(range(20))[shard_slice(20, (i, n))] for i in range(n)]
        assert sum(blocks, []) == list(range(20))
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1-2", "a/b", "-1/3"):
        with pytest.raises(CurationInputError, match="--shard"):
            parse_shard(bad)


def test_embed_stage_outputs_errors_and_idempotence(image_folder, tmp_path):
    model = MeanColourBackbone()
    out = tmp_path / "out"
    result = embed_stage(image_folder, out, model=model, image_size=28, resize_size=32, batch_size=3, part_size=4, progress=False)
    embeddings = np.load(out / "embeddings.npy")
    paths = (out / "paths.txt").read_text().splitlines()
    errors = (out / "errors.txt").read_text().splitlines()
    assert len(paths) == 6 and not any("broken" in p for p in paths)
    assert len(errors) == 1 and errors[0].startswith(str(image_folder / "sub" / "broken.png") + "\t")
    assert embeddings.shape == (6, 51) and embeddings.dtype == np.float32
    for row, path in zip(embeddings, paths):
        np.testing.assert_allclose(row, expected_features(model, path), atol=1e-5)
    assert result.summary == {"embedded": 6, "errors": 1, "dim": 51, "images": 7}
    calls = model.calls
    assert embed_stage(image_folder, out, model=model, image_size=28, resize_size=32, part_size=4, progress=False).skipped
    assert model.calls == calls


def test_embed_resumes_after_a_kill(image_folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        embed_stage(image_folder, out, model=MeanColourBackbone(fail_after=1), image_size=28, resize_size=32, batch_size=2, part_size=2, progress=False)
    assert not (out / "embeddings.npy").exists()
    model = MeanColourBackbone()
    embed_stage(image_folder, out, model=model, image_size=28, resize_size=32, batch_size=2, part_size=2, progress=False)
    assert model.calls == 3  # parts 2, 3, 4 only: part 1 was saved before the kill
    reference = tmp_path / "ref"
    embed_stage(image_folder, reference, model=MeanColourBackbone(), image_size=28, resize_size=32, part_size=2, progress=False)
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), np.load(reference / "embeddings.npy"), atol=1e-6)


def test_shards_merge_into_the_unsharded_result(image_folder, tmp_path):
    kwargs = dict(model=MeanColourBackbone(), image_size=28, resize_size=32, part_size=3, dtype="float16", progress=False)
    whole = tmp_path / "whole"
    embed_stage(image_folder, whole, **kwargs)
    sharded = tmp_path / "sharded"
    for index in (1, 0, 2):
        embed_stage(image_folder, sharded, shard=(index, 3), **kwargs)
        assert not (sharded / "embeddings.npy").exists()  # shards never merge by themselves
    assert merge_embed_shards(sharded).summary["shards"] == 3  # the one shard count found
    merged = np.load(sharded / "embeddings.npy")
    assert merged.dtype == np.float16
    np.testing.assert_array_equal(merged, np.load(whole / "embeddings.npy"))
    for name in ("paths.txt", "errors.txt"):
        assert (sharded / name).read_text() == (whole / name).read_text()


def test_all_images_corrupt_is_an_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"junk")
    with pytest.raises(CurationInputError, match="none of the images could be decoded"):
        embed_stage(tmp_path / "imgs", tmp_path / "out", model=MeanColourBackbone(), image_size=28, resize_size=32, progress=False)
    assert not (tmp_path / "out" / "embeddings.npy").exists()


def test_embed_with_the_hub_backbone(image_folder, tmp_path):
    pytest.importorskip("dinov2.hub.backbones")
    out = tmp_path / "out"
    result = embed_stage(
        image_folder, out, backbone="dinov2_vits14", weights="random", backbone_kwargs={"img_size": 56},
        image_size=56, resize_size=64, batch_size=4, part_size=8, progress=False,
    )
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (6, 384) and result.summary["dim"] == 384
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(embeddings).all() and not np.allclose(embeddings[0], embeddings[1])


def test_a_part_of_only_broken_images_and_too_many_shards(image_folder, tmp_path):
    kwargs = dict(model=MeanColourBackbone(), image_size=28, resize_size=32, progress=False)
    embed_stage(image_folder, tmp_path / "one", part_size=1, **kwargs)  # broken.png is a part of its own
    embed_stage(image_folder, tmp_path / "four", part_size=4, **kwargs)
    np.testing.assert_allclose(np.load(tmp_path / "one" / "embeddings.npy"), np.load(tmp_path / "four" / "embeddings.npy"), atol=1e-6)
    with pytest.raises(CurationInputError, match="more shards than the 7 images"):
        embed_stage(image_folder, tmp_path / "sharded", shard=(0, 8), **kwargs)


def test_weights_that_cannot_be_downloaded_say_how_to_pass_local_ones(tmp_path, monkeypatch):
    """A real download attempt that fails (nothing listens on port 9): a CurationInputError that
    says how to pass local weights, not a URLError traceback."""
    pytest.importorskip("dinov2.hub.backbones")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    url = "http://127.0.0.1:9/weights/my_vits14_pretrain.pth"
    with pytest.raises(CurationInputError) as caught:
        load_model("dinov2_vits14", url, img_size=28)
    message = str(caught.value)
    assert f"cannot download the {url} weights of dinov2_vits14 from {url}" in message
    assert "--weights /path/to/my_vits14_pretrain.pth" in message and str(tmp_path / "torch_home") in message


@pytest.mark.slow
def test_offline_with_the_released_weights_names_the_file_to_fetch(image_folder, tmp_path):
    """The CLI, offline (all HTTPS through a proxy that refuses), default released weights."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    env.update(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", TORCH_HOME=str(tmp_path / "th"))
    done = subprocess.run([sys.executable, "-m", "data_curation.cli", "-q", "embed", "--images", str(image_folder),
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert f"cannot download the LVD142M weights of dinov2_vits14 from {url}" in done.stderr
    assert "--weights /path/to/dinov2_vits14_pretrain.pth" in done.stderr
