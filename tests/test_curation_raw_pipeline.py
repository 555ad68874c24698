"""`dinov2-curate run` with the raw-pool stages on real photos: hash-dedup -> embed -> filter ->
self-dedup -> manifest -> blur-faces, then a rerun that does nothing."""

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("cv2")

from data_curation.cli import main  # noqa: E402
from data_curation.examples.planted_photos import write_planted_photos  # noqa: E402


def test_run_with_raw_pool_stages(tmp_path, capsys):
    planted = write_planted_photos(tmp_path / "images", copies_per_kind=4,
                                   photos=("astronaut", "camera", "coffee", "coins", "horse", "rocket"), seed=2)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    rng = np.random.default_rng(0)
    head = tmp_path / "head.npz"
    np.savez(head, weight=rng.standard_normal((1, 192)).astype(np.float32) * 8, bias=np.array([-4.0], np.float32))
    config = tmp_path / "curation.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'run'}\nprogress: false\n"
        "hash_dedup:\n  enabled: true\n"
        f"embed:\n  images: {tmp_path / 'images'}\n  backbone: thumbnail\n  weights: random\n  image_size: 56\n  resize_size: 64\n"
        f"filter:\n  enabled: true\n  classifier: {head}\n  threshold: 0.5\n"
        "self_dedup:\n  k: 4\n  threshold: 0.95\n"
        "kmeans:\n  enabled: false\n"
        "blur_faces:\n  enabled: true\n"
    )
    assert main(["-q", "run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "hash-dedup: rows in" in out and "removed: undecodable 1, near_copy" in out and "filter: rows in" in out
    run = tmp_path / "run"
    hash_kept = (run / "hash_dedup" / "kept_paths.txt").read_text().splitlines()
    assert (run / "embed" / "paths.txt").read_text().splitlines() == sorted(hash_kept)
    filter_removed = int(np.load(run / "filter" / "scores.npy").__gt__(0.5).sum())
    assert filter_removed > 0
    manifest = (run / "manifest.txt").read_text().splitlines()
    blurred_astronaut = [p for p in manifest if "/blur_faces/blurred/" in p]
    assert blurred_astronaut and all(p.endswith(".png") for p in blurred_astronaut)
    assert str(planted.root / "originals" / "astronaut.png") not in manifest
    assert len(manifest) <= len(hash_kept) - filter_removed
    assert main(["-q", "run", "--config", str(config)]) == 0
    again = capsys.readouterr().out
    assert again.count("up to date, nothing to do") == 6  # hash-dedup, embed, filter, dedup, manifest, blur-faces
