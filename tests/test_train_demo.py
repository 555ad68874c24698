"""`make demo` end to end at a tiny length: the three kNN numbers, the files it promises, and the
raw-pixel baseline against an independent kNN (scikit-learn, cosine, majority vote)."""

import json

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from dinov2.cli import demo
from dinov2.configs import ConfigError, load_config
from dinov2.data import MNISTDemoDataset


def test_demo_writes_the_three_knn_numbers(tmp_path):
    before = torch.get_num_threads()
    assert demo.main([
        "--output-dir", str(tmp_path), "--fresh", "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=3",
        "evaluation.knn_every_n_steps=0", "logging.tensorboard=false", "logging.progress_bar=false",
        "data.num_workers=0",
    ]) == 0
    assert torch.get_num_threads() == before  # the demo's compute.num_threads=1 held only during its run
    results = json.loads((tmp_path / "knn.json").read_text())
    assert set(results) == {"learned", "random_init", "raw_pixels"}
    assert all(10.0 <= v <= 100.0 for v in results.values())  # 10 balanced classes: chance is 10 %
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert (tmp_path / "run" / "checkpoints").is_dir()

    # Raw pixels: a weighted (T=0.07) cosine kNN vote vs an unweighted one agree to a few points.
    train, held_out = MNISTDemoDataset("train"), MNISTDemoDataset("held_out")

    def pixels(ds):
        return ds.images.reshape(len(ds.images), -1).astype(np.float32)

    reference = KNeighborsClassifier(n_neighbors=demo.K, metric="cosine").fit(pixels(train), train.targets)
    reference_top1 = 100.0 * (reference.predict(pixels(held_out)) == held_out.targets).mean()
    assert abs(results["raw_pixels"] - reference_top1) < 2.0
    assert reference_top1 > 85.0  # kNN on MNIST pixels is a strong baseline


def test_num_threads_must_be_positive():
    with pytest.raises(ConfigError, match=r"compute.num_threads=0 is out of range: must be >= 1"):
        load_config("train/demo_mnist.yaml", ["compute.num_threads=0"])


def _as_uint8(x: torch.Tensor, cfg) -> bytes:
    """Undo the evaluation normalisation of a 28-px digit (resize ratio 1: no resampling)."""
    pixels = (x * cfg.crops.std[0] + cfg.crops.mean[0]) * 255.0
    return torch.round(pixels).clamp(0, 255).to(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("seed", [0, 1])
def test_demo_knn_uses_the_split_its_training_never_saw(seed):
    """The demo trains on ``mnist:train``; its kNN memory bank must be those digits and its queries
    the held-out ones, whatever ``train.seed`` (it used to redraw the split from ``train.seed``, so
    with seed 1 about 80 % of the queries were training images)."""
    from dinov2.train.knn_monitor import KnnMonitor

    cfg = load_config("train/demo_mnist.yaml", [f"train.seed={seed}"])
    monitor = KnnMonitor(cfg)
    for part, name in ((monitor.splits.train, "train"), (monitor.splits.val, "held_out")):
        expected = MNISTDemoDataset(name)
        got = sorted(_as_uint8(part[i][0], cfg) for i in range(len(part)))
        assert got == sorted(img.tobytes() for img in expected.images), name
    assert demo.raw_pixel_top1(cfg) == demo.raw_pixel_top1(load_config("train/demo_mnist.yaml"))


def test_query_labels_without_a_query_set_are_a_config_error():
    with pytest.raises(ConfigError, match=r"evaluation.val_labels=y.npy is set but evaluation.val_dataset is not"):
        load_config(None, ["evaluation.dataset=mnist", "evaluation.val_labels=y.npy"])
