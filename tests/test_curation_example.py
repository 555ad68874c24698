"""End to end on real photos (scikit-image) with flipped and cropped copies planted."""

import pytest

pytest.importorskip("skimage")


@pytest.mark.slow
def test_skimage_photos_example_finds_every_planted_copy(tmp_path):
    from data_curation.examples.skimage_photos import PHOTOS, run_example

    summary = run_example(tmp_path / "example")
    assert summary["errors"] == 1  # broken.png is reported, not fatal
    assert summary["planted_copies"] == 2 * len(PHOTOS)
    assert summary["copies_in_their_original_component"] == summary["planted_copies"]
    assert summary["distinct_photos_merged"] == 0
    assert summary["kept_after_self_dedup"] == len(PHOTOS)  # one image per photo
    assert summary["kept_after_relative_dedup"] == 3 * len(PHOTOS) - 6  # 2 evaluation photos and their copies
    assert summary["nearest_to_coffee"][0] == "coffee.png"
    assert set(summary["nearest_to_coffee"][1:]) == {"coffee_flip.jpg", "coffee_crop.jpg"}
    assert summary["run_manifest_lines"] == 12
    assert 0 < summary["manifest_lines"] <= 12


@pytest.mark.slow
def test_raw_pool_example_runs_end_to_end(tmp_path):
    pytest.importorskip("cv2")
    from data_curation.examples.planted_photos import run_example

    scores = run_example(tmp_path / "raw", copies_per_kind=5)
    assert scores["errors"] == 1 and scores["precision"] >= 0.9 and scores["recall"] >= 0.6
    assert "astronaut" in (tmp_path / "raw" / "blur_faces" / "faces.csv").read_text()
