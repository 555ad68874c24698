"""`filter` (classifier head over embeddings) and `blur-faces` (OpenCV Haar cascade on a real face)."""

import numpy as np
import pytest
import torch
from PIL import Image

from data_curation.arrays import CurationInputError
from data_curation.classifier import load_classifier
from data_curation.filter_stage import filter_stage
from data_curation.report import read_report
from data_curation.synthetic import random_unit_vectors

skimage_data = pytest.importorskip("skimage.data")
cv2 = pytest.importorskip("cv2")


def save_pool(folder, embeddings, with_images=True):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", embeddings)
    paths = []
    for row in range(embeddings.shape[0]):
        path = folder / f"img_{row:03d}.png"
        if with_images:
            Image.new("RGB", (16, 16), (row % 256, 0, 0)).save(path)
        paths.append(str(path))
    (folder / "paths.txt").write_text("".join(p + "\n" for p in paths))
    return paths


def test_linear_and_mlp_heads_match_torch(tmp_path):
    x = random_unit_vectors(50, 12, np.random.default_rng(0))
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    torch.save(mlp.state_dict(), tmp_path / "mlp.pth")
    head = load_classifier(tmp_path / "mlp.pth")
    expected = torch.softmax(mlp(torch.from_numpy(x)), dim=1)[:, [0, 2]].sum(1).detach().numpy()
    np.testing.assert_allclose(head.scores(x, [0, 2]), expected, rtol=1e-5, atol=1e-6)
    linear = torch.nn.Linear(12, 1)
    np.savez(tmp_path / "linear.npz", weight=linear.weight.detach().numpy(), bias=linear.bias.detach().numpy())
    expected = torch.sigmoid(linear(torch.from_numpy(x)))[:, 0].detach().numpy()
    np.testing.assert_allclose(load_classifier(tmp_path / "linear.npz").scores(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(CurationInputError, match="3 outputs: say which classes"):
        head.scores(x)


def test_filter_removes_exactly_the_rows_above_the_threshold(tmp_path):
    rng = np.random.default_rng(1)
    x = random_unit_vectors(300, 16, rng)
    direction = x[0]
    np.savez(tmp_path / "head.npz", weight=(20 * direction)[None], bias=np.array([-10.0], dtype=np.float32))
    paths = save_pool(tmp_path / "pool", x)
    out = tmp_path / "filter"
    result = filter_stage(tmp_path / "pool" / "embeddings.npy", tmp_path / "head.npz", out, threshold=0.5,
                          chunk_rows=64, progress=False)
    expected_scores = 1 / (1 + np.exp(-(20 * x @ direction - 10)))
    np.testing.assert_allclose(np.load(out / "scores.npy"), expected_scores, rtol=1e-5)
    expected_keep = np.flatnonzero(expected_scores <= 0.5)
    np.testing.assert_array_equal(np.load(out / "keep.npy"), expected_keep)
    assert 0 not in expected_keep and result.summary["removed_classifier"] == 300 - expected_keep.size
    assert result.summary["rows_in"] == 300 and result.summary["rows_out"] == expected_keep.size
    rows = read_report(out / "report.csv")
    assert len(rows) == 300 and rows[0]["path"] == paths[0] and rows[0]["decision"] == "removed"
    assert float(rows[0]["link"]) >= float(rows[-1]["link"])
    assert (out / "contact_sheet.png").is_file()
    assert filter_stage(tmp_path / "pool" / "embeddings.npy", tmp_path / "head.npz", out, threshold=0.5,
                        chunk_rows=64, progress=False).skipped


def test_filter_rejects_bad_input_before_any_work(tmp_path):
    x = random_unit_vectors(20, 16, np.random.default_rng(0))
    save_pool(tmp_path / "pool", x, with_images=False)
    emb = tmp_path / "pool" / "embeddings.npy"
    torch.save(torch.nn.Linear(384, 2).state_dict(), tmp_path / "wrong_dim.pth")
    with pytest.raises(CurationInputError, match="takes 384-dimensional input but the embeddings .* have dimension 16"):
        filter_stage(emb, tmp_path / "wrong_dim.pth", tmp_path / "out", threshold=0.5, progress=False)
    np.savez(tmp_path / "ok.npz", weight=np.ones((2, 16), np.float32), bias=np.zeros(2, np.float32))
    with pytest.raises(CurationInputError, match=r"probability in \[0, 1\]"):
        filter_stage(emb, tmp_path / "ok.npz", tmp_path / "out", threshold=1.5, progress=False)
    with pytest.raises(CurationInputError, match="classifier file not found"):
        filter_stage(emb, tmp_path / "nope.pth", tmp_path / "out", threshold=0.5, progress=False)
    np.savez(tmp_path / "broken.npz", **{"0.weight": np.ones((4, 16), np.float32), "1.weight": np.ones((2, 5), np.float32)})
    with pytest.raises(CurationInputError, match="takes 5 inputs but the layer before gives 4"):
        filter_stage(emb, tmp_path / "broken.npz", tmp_path / "out", threshold=0.5, progress=False)
    assert not (tmp_path / "out").exists()


def test_blur_faces_changes_the_face_and_nothing_else(tmp_path):
    from data_curation.blur_faces import blur_faces_stage

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    astronaut = skimage_data.astronaut()
    Image.fromarray(astronaut).save(images / "sub" / "astronaut.png")
    Image.fromarray(skimage_data.coffee()).save(images / "coffee.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "blurred_out"
    result = blur_faces_stage(images, out, progress=False)
    s = result.summary
    assert (s["rows_in"], s["removed_undecodable"], s["rows_out"], s["images_with_faces"], s["faces"]) == (3, 1, 2, 1, 1)
    assert (out / "errors.txt").read_text().startswith(str(images / "broken.png") + "\t")
    blurred = out / "blurred" / "sub" / "astronaut.png"
    assert (out / "manifest.txt").read_text().splitlines() == [str(images / "coffee.png"), str(blurred)]
    header, face = (out / "faces.csv").read_text().splitlines()
    x, y, w, h = (int(v) for v in face.split(",")[2:6])
    # The astronaut's face (Eileen Collins) lies around x 180-270, y 60-160 of the 512 x 512 photo.
    assert 150 < x + w / 2 < 260 and 80 < y + h / 2 < 150 and 60 < w < 160
    after = np.asarray(Image.open(blurred).convert("RGB")).astype(int)
    changed = np.abs(after - astronaut).sum(axis=2) > 0
    left, top = x - round(0.1 * w), y - round(0.1 * h)
    inside = np.zeros_like(changed)
    inside[top : y + h + round(0.1 * h), left : x + w + round(0.1 * w)] = True
    assert not changed[~inside].any()  # every pixel outside the face box is untouched
    assert changed[inside].mean() > 0.5  # and the face region is blurred
    face_before = astronaut[y : y + h, x : x + w].astype(float)
    face_after = after[y : y + h, x : x + w]
    assert np.abs(np.diff(face_after, axis=1)).mean() < 0.5 * np.abs(np.diff(face_before, axis=1)).mean()
    assert np.array_equal(np.asarray(Image.open(images / "sub" / "astronaut.png")), astronaut)  # never in place
    assert blur_faces_stage(images, out, progress=False).skipped

    with pytest.raises(CurationInputError, match="face cascade 'nope.xml' not found; shipped with OpenCV: .*haarcascade_frontalface_default.xml"):
        blur_faces_stage(images, tmp_path / "o2", cascade="nope.xml", progress=False)
    with pytest.raises(CurationInputError, match="inside the image folder"):
        blur_faces_stage(images, images / "blurred", progress=False)
    assert not (tmp_path / "o2").exists() and not (images / "blurred").exists()
