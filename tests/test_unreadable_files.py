"""One rule for bad files everywhere: unreadable images are skipped, counted and named;
misaligned inputs are refused with a clear error (real files, real CLI calls)."""

import io
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_curation.cli import main as curate
from dinov2.data import ManifestDataset
from dinov2.cli.eval import main as evaluate
from dinov2.eval.data import load_dataset
from dinov2.eval.features import extract_features


def _jpeg(path, grey, size=(24, 24)):
    rs = np.random.RandomState(grey)
    arr = np.clip(grey + rs.randint(-3, 4, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=95)


def _truncated_jpeg(path):
    """A real JPEG with its second half cut off."""
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        Image.open(path).load()


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "labelled"
    for label, grey in (("dark", 40), ("light", 200)):
        (root / label).mkdir(parents=True)
        for i in range(6):
            _jpeg(root / label / f"{i}.jpg", grey + 2 * i)
    bad = root / "light" / "3_truncated.jpg"
    _truncated_jpeg(bad)
    return root, bad


def test_eval_knn_skips_a_truncated_jpeg_counts_and_names_it(class_folder, tmp_path, capsys, caplog):
    root, bad = class_folder
    out = tmp_path / "knn.json"
    argv = ["knn", "--backbone", "dinov2_vits14", "--weights", "random", "--data", str(root), "--img-size", "14",
            "--resize-ratio", "1", "--ks", "1", "3", "--no-progress", "--output-json", str(out)]
    with caplog.at_level(logging.WARNING, logger="dinov2.data.unreadable"):
        assert evaluate(argv) == 0
    line = capsys.readouterr().out
    assert "1 unreadable files skipped" in line
    res = json.loads(out.read_text())
    assert res["skipped_files"]["count"] == 1
    assert [str(bad)] == res["skipped_files"]["train"] + res["skipped_files"]["val"]
    assert res["n_train"] + res["n_test"] == 12  # 13 files, the truncated one left out
    assert str(bad) in caplog.text and "truncated" in caplog.text
    assert res["results"]["1"]["top1"] == 100.0  # dark vs light: labels stayed aligned

    features = ["features", *argv[1:9], "--no-progress", "--output-dir", str(tmp_path / "f")]
    assert evaluate(features) == 0
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["skipped_files"] == {"count": 1, "all": [str(bad)]}
    assert np.load(tmp_path / "f" / "labels.npy").tolist() == [0] * 6 + [1] * 6


def test_features_drop_unreadable_rows_and_keep_labels_aligned(class_folder):
    root, bad = class_folder
    ds = load_dataset(str(root), transform=lambda img: torch.tensor(np.asarray(img.convert("L"), np.float32).mean()))

    class MeanGrey(torch.nn.Module):  # "features" = the image's mean grey level, 1 block
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def get_intermediate_layers(self, x, n=1, return_class_token=True, norm=True):
            return [(x[:, None, None], x[:, None] * self.w)]

    feats = extract_features(MeanGrey(), ds, batch_size=4, progress=False)
    assert feats.skipped == (str(bad),)
    assert len(feats) == 12 and feats.cls.shape == (12, 1, 1)
    # light images (label 1) are bright, dark ones (label 0) dark: row i still has its label
    assert np.array_equal(feats.labels, (feats.cls[:, 0, 0] > 128).astype(np.int64))
    for name in os.listdir(root / "light"):
        if name != bad.name:
            os.remove(root / "light" / name)
    for name in os.listdir(root / "dark"):
        (root / "dark" / name).write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="none of the 7 samples could be read"):
        extract_features(MeanGrey(), load_dataset(str(root), transform=np.asarray), progress=False)


@pytest.mark.skipif(sys.getfilesystemencoding().lower() != "utf-8", reason="needs a UTF-8 file system encoding")
def test_curate_embed_and_manifest_keep_a_non_utf8_filename(tmp_path, caplog):
    pool = tmp_path / "pool"
    pool.mkdir()
    _jpeg(pool / "a.jpg", 30)
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # not valid UTF-8: os.fsdecode gives a surrogate
    _jpeg(pool / latin1, 120)
    _truncated_jpeg(pool / "z_truncated.jpg")
    out = tmp_path / "out"
    argv = ["-q", "embed", "--images", str(pool), "--backbone", "thumbnail", "--output-dir", str(out),
            "--image-size", "28", "--resize-size", "32"]
    with caplog.at_level(logging.WARNING, logger="dinov2.data.unreadable"):
        assert curate(argv) == 0
    assert "z_truncated.jpg" in caplog.text
    assert np.load(out / "embeddings.npy").shape[0] == 2
    raw = (out / "paths.txt").read_bytes()
    assert os.fsencode(str(pool)) + b"/caf\xe9.jpg\n" in raw  # the file's own bytes
    assert b"z_truncated.jpg\t" in (out / "errors.txt").read_bytes()
    assert curate(argv) == 0  # rerun: up to date, nothing re-embedded or broken

    np.save(tmp_path / "all.npy", np.arange(2))
    manifest = tmp_path / "manifest.txt"
    assert curate(["manifest", "--paths", str(out / "paths.txt"), "--select", str(tmp_path / "all.npy"),
                   "--output", str(manifest)]) == 0
    assert manifest.read_bytes() == raw
    ds = ManifestDataset(str(manifest))  # the trainer reads the same files back
    assert ds.paths[1] == str(pool / latin1) and ds[1][0].size == (24, 24)


@pytest.mark.parametrize("lines", [4, 2])
def test_manifest_refuses_a_paths_file_misaligned_with_the_embeddings(tmp_path, capsys, lines):
    np.save(tmp_path / "embeddings.npy", np.eye(3, dtype=np.float32))
    (tmp_path / "paths.txt").write_text("".join(f"/data/{i}.jpg\n" for i in range(lines)))
    np.save(tmp_path / "sel.npy", np.arange(2))
    output = tmp_path / "m" / "manifest.txt"
    code = curate(["manifest", "--paths", str(tmp_path / "paths.txt"), "--select", str(tmp_path / "sel.npy"),
                   "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"lists {lines} paths" in err and "has 3 rows" in err
    assert str(tmp_path / "paths.txt") in err and str(tmp_path / "embeddings.npy") in err
    assert not output.exists()
