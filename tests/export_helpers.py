"""Shared by the export / described-backbone tests: a tiny trained run and small labelled sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gloo_ranks import DIST_TINY, write_dataset

SINGLE = [x for x in DIST_TINY if not x.startswith("distributed.launcher")] + ["distributed.launcher=single"]


def train_tiny_run(tmp: Path, *extra: str):
    """A 1-step run of the tiny recipe (ViT width 32, 2 blocks, 2 heads, patch 7, 1 channel, 28 px,
    mean 0.13 / std 0.31) in ``tmp/run``; returns (trainer, run_dir)."""
    from dinov2.configs import load_config
    from dinov2.train.train import Trainer

    overrides = SINGLE + [write_dataset(tmp / "images.npy"), "train.max_steps=1", *extra]
    trainer = Trainer(load_config(None, overrides), tmp / "run")
    trainer.fit()
    return trainer, tmp / "run"


def labelled_grey_set(directory: Path, side: int = 28, per_class: int = 12, classes: int = 3) -> tuple[str, str]:
    """Near-constant grey images, one grey level per class: (images.npy, labels.npy)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    images = np.clip(40 + 80 * labels[:, None, None] + rng.normal(0, 4, (len(labels), side, side)), 0, 255)
    np.save(directory / "x.npy", images.astype(np.uint8))
    np.save(directory / "y.npy", labels)
    return str(directory / "x.npy"), str(directory / "y.npy")
