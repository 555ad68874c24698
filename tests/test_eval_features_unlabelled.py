"""dinov2-eval features on an unlabelled folder: embeddings plus the file paths (read back unchanged,
also for names that are not valid UTF-8), rows aligned with paths when a file is unreadable."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.eval.backbone import resolve_backbone
from dinov2.cli.eval import main
from dinov2.eval.data import eval_transform
from dinov2.eval.features import read_paths, write_paths
from dinov2.models.vision_transformer import vit_small


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("unlabelled")
    torch.manual_seed(0)
    model = vit_small(patch_size=14, img_size=28, embed_dim=32, depth=1, num_heads=2, block_chunks=0, init_values=1.0)
    torch.save(model.state_dict(), d / "backbone.pth")
    pool = d / "pool"
    (pool / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["a.png", "sub/b.png", "c.jpg"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(pool / name)
    raw = os.fsencode(str(pool)) + b"/caf\xe9.png"  # not valid UTF-8
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(raw.decode("latin-1") + ".tmp.png")
    os.rename(raw.decode("latin-1") + ".tmp.png", raw)
    (pool / "broken.png").write_bytes(b"not a png")
    return d, pool


def test_features_and_paths_of_an_unlabelled_folder(setup, tmp_path, capsys):
    d, pool = setup
    out = tmp_path / "out"
    argv = ["features", "--backbone-file", str(d / "backbone.pth"), "--arch", "vit_small", "--embed-dim", "32",
            "--depth", "1", "--num-heads", "2", "--images", f"folder:{pool}", "--img-size", "28", "--output-dir",
            str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "features of 4 images" in capsys.readouterr().out
    features = np.load(out / "features.npy")
    paths = read_paths(str(out / "paths.txt"))
    assert features.shape == (4, 32) and len(paths) == 4
    assert os.fsencode(str(pool)) + b"/caf\xe9.png" in [os.fsencode(p) for p in paths]  # the same bytes
    assert not any(p.endswith("broken.png") for p in paths)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped_files"]["count"] == 1 and meta["skipped_files"]["all"][0].endswith("broken.png")
    # Row i is the embedding of the file on line i (recomputed independently, one image at a time).
    model = resolve_backbone(backbone_file=str(d / "backbone.pth"), arch="vit_small", embed_dim=32, depth=1,
                             num_heads=2)
    transform = eval_transform(28)
    for row, path in zip(features, paths):
        with Image.open(path) as image:
            x = transform(image.convert("RGB"))[None]
        with torch.no_grad():
            expected = model(x)[0].numpy()
        np.testing.assert_allclose(row, expected, atol=1e-5)
    # A bare directory is the same spec; --images with --data is an error.
    bare = [str(tmp_path / "bare") if a == str(out) else str(pool) if a == f"folder:{pool}" else a for a in argv]
    assert main(bare) == 0
    capsys.readouterr()
    assert read_paths(str(tmp_path / "bare" / "paths.txt")) == paths
    assert main([*argv, "--data", "mnist"]) == 2
    assert "give --images (unlabelled) or --data" in capsys.readouterr().err


def test_paths_file_round_trip(tmp_path):
    names = ["/a b/c.png", os.fsdecode(b"/x/\xff\xfe.png"), "/t\tab.png", "/ü.png"]
    write_paths(str(tmp_path / "p.txt"), names)
    assert read_paths(str(tmp_path / "p.txt")) == names
    with pytest.raises(ValueError, match="line break"):
        write_paths(str(tmp_path / "q.txt"), ["/a\nb.png"])
