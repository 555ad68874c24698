"""Image sources: a folder, a labelled class-per-folder tree, a manifest of paths, a .npy array.

Every file is read through an iopath ``PathManager`` (``g_pathmgr`` unless one is
passed), so another storage backend only needs a registered path handler. Items are
``(image, target)`` with ``target = -1`` when there is no label, as the official
dinov2 datasets return. Images are decoded lazily in ``__getitem__``; a file that
cannot be decoded raises there and is skipped by ``SkipUnreadable``
(see unreadable.py), not here, so these classes stay simple and honest.
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from iopath.common.file_io import PathManager, g_pathmgr
from torch.utils.data import Dataset

from .images import image_extensions, list_image_files, load_image  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

UNLABELLED = -1


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively), unlabelled.

    The listing and decoding rules are those of ``images.py``: any extension PIL can
    decode, hidden entries ignored, cycle-safe, regular files only, each real file once;
    16-bit images scaled to 8 bits.
    """

    def __init__(self, root: str, *, mode: Optional[str] = "RGB", path_manager: Optional[PathManager] = None):
        self.root = str(root)
        self.mode = mode
        self.path_manager = path_manager or g_pathmgr
        if not self.path_manager.exists(self.root):
            raise FileNotFoundError(f"image folder does not exist: {self.root}")
        if not self.path_manager.isdir(self.root):
            raise NotADirectoryError(f"not a folder: {self.root}")
        self.paths = list_image_files(self.root, path_manager=self.path_manager)
        if not self.paths:
            raise ValueError(f"no images found under {self.root} (searched recursively for files PIL can open)")
        logger.info("ImageFolderDataset: %d images under %s", len(self.paths), self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int):
        return load_image(self.paths[index], self.mode, self.path_manager), UNLABELLED


class ClassFolderDataset(Dataset):
    """Labelled images laid out as ``root/<class>/.../<image>`` (torchvision ``ImageFolder``
    layout): classes are the non-hidden sub-folders in sorted order, the label of an image
    is the index of its class, samples are ordered by class then path.

    Listed and decoded by the rules of ``images.py`` (one walk over ``root``, cycle-safe);
    images directly in ``root`` belong to no class and are ignored. Items are
    ``(transform(image), label)``; ``mode=None`` keeps the file's channels (8-bit).
    Raises ValueError naming the folder when there are no class folders or a class
    folder holds no image.
    """

    def __init__(self, root: str, *, transform=None, mode: Optional[str] = None):
        self.root = os.fspath(root)
        self.transform = transform
        self.mode = mode
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"data folder not found: {self.root}")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        by_class: dict = {c: [] for c in self.classes}
        loose = 0
        for path in list_image_files(self.root):
            top = os.path.relpath(path, self.root).split(os.sep)
            if len(top) == 1:
                loose += 1
            elif top[0] in by_class:
                by_class[top[0]].append(path)
        if not self.classes:
            hint = f" ({loose} images sit directly in it)" if loose else ""
            raise ValueError(f"{self.root}: no class sub-folders{hint}; expected ROOT/<class>/<image> for a labelled folder")
        empty = [c for c in self.classes if not by_class[c]]
        if len(empty) == len(self.classes):
            raise ValueError(f"{self.root}: no images found in any class folder (file types PIL can decode)")
        if empty:
            raise ValueError(f"{self.root}: class folder(s) without images: {', '.join(empty)}")
        self.samples: List[Tuple[str, int]] = [(p, self.class_to_idx[c]) for c in self.classes for p in by_class[c]]
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = load_image(path, self.mode)
        return (self.transform(img) if self.transform is not None else img), target


def _dirname(path: str) -> str:
    # URI-aware: os.path.dirname("s3://bucket") would eat the "//".
    scheme, sep, rest = path.partition("://")
    if sep:
        return scheme + sep + posixpath.dirname(rest)
    return os.path.dirname(path)


def _resolve(entry: str, base: str) -> str:
    # Absolute paths and URIs ("s3://...", "manifold://...") are used as written.
    if os.path.isabs(entry) or "://" in entry:
        return entry
    if "://" in base:
        return posixpath.join(base, entry) if not base.endswith("://") else base + entry
    return os.path.join(base, entry)


class ManifestDataset(Dataset):
    """Images listed in a text manifest, one per line (what data curation writes).

    Relative paths are resolved against the manifest's folder. A line may carry an
    integer label after a tab (``path<TAB>label``); blank lines and lines starting
    with ``#`` are ignored.
    """

    def __init__(self, manifest_path: str, *, mode: Optional[str] = "RGB",
                 path_manager: Optional[PathManager] = None):
        self.manifest_path = str(manifest_path)
        self.mode = mode
        self.path_manager = path_manager or g_pathmgr
        if not self.path_manager.exists(self.manifest_path):
            raise FileNotFoundError(f"manifest does not exist: {self.manifest_path}")
        base = _dirname(self.manifest_path)
        self.paths: List[str] = []
        self.targets: List[int] = []
        # surrogateescape: a path that is not valid UTF-8 (os.fsdecode of its bytes, as
        # curation writes it) comes back as the same str, so it opens the same file.
        with self.path_manager.open(self.manifest_path, "r", encoding="utf-8", errors="surrogateescape") as f:
            for line_no, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                path, sep, label = line.partition("\t")
                try:
                    target = int(label) if sep else UNLABELLED
                except ValueError:
                    raise ValueError(f"{self.manifest_path}:{line_no}: label {label!r} is not an integer") from None
                self.paths.append(_resolve(path.strip(), base))
                self.targets.append(target)
        if not self.paths:
            raise ValueError(f"manifest lists no images: {self.manifest_path}")
        logger.info("ManifestDataset: %d entries from %s", len(self.paths), self.manifest_path)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int):
        return load_image(self.paths[index], self.mode, self.path_manager), self.targets[index]


class NumpyArrayDataset(Dataset):
    """Images from an array of shape (N, C, H, W) or (N, H, W): a ``.npy`` file (memory-mapped) or an
    array in memory -- the project's one dataset of image arrays (training ``npy:`` sets, eval arrays, MNIST).

    Items are ``(image, target)``: a tensor (C, H, W) -- (1, H, W) for a 3-D array -- of dtype uint8 or
    float32 (any float array is returned as float32), so multi-band data (any C) flows straight into
    ``DataAugmentationDINO(num_channels=C)``; ``transform(image)`` when a ``transform`` is given.
    ``labels`` is an optional array-like or .npy path of N integers; ``target`` is -1 without them.
    ``classes`` names the labels ``"0"`` ... ``"max"`` (empty without labels).
    """

    def __init__(self, source: Union[str, np.ndarray], labels: Union[None, str, Sequence[int], np.ndarray] = None, *,
                 transform=None, path_manager: Optional[PathManager] = None):
        self.transform = transform
        self.path_manager = path_manager or g_pathmgr
        if isinstance(source, np.ndarray):
            self.path, self._local_path, self._array = None, None, source
        else:
            self.path = str(source)
            if not self.path_manager.exists(self.path):
                raise FileNotFoundError(f"array file does not exist: {self.path}")
            self._local_path = self.path_manager.get_local_path(self.path)
            self._array: Optional[np.ndarray] = None
        where = self.path or "image array"
        array = self.array
        if array.ndim not in (3, 4):
            raise ValueError(f"{where}: expected shape (N, C, H, W) or (N, H, W), got {array.shape}")
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{where}: dtype {array.dtype} unsupported; store uint8 or float data")
        if len(array) == 0:
            raise ValueError(f"{where}: the array holds no images")
        if isinstance(labels, str):
            labels = np.load(self.path_manager.get_local_path(labels))
        self.targets = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.targets is not None and self.targets.shape != (len(array),):
            raise ValueError(f"{where}: {len(array)} images but labels of shape {self.targets.shape}")
        n_classes = int(self.targets.max()) + 1 if self.targets is not None else 0
        self.classes = [str(i) for i in range(n_classes)]

    @property
    def array(self) -> np.ndarray:
        # A file is opened lazily, so pickling to DataLoader workers sends a path, not the data.
        if self._array is None:
            self._array = np.load(self._local_path, mmap_mode="r")
        return self._array

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.path is not None:
            state["_array"] = None
        return state

    def __len__(self) -> int:
        return len(self.array)

    def describe(self, index: int) -> str:
        return f"{self.path or 'image array'}[{index}]"

    def __getitem__(self, index: int):
        item = np.array(self.array[index])  # copy out of the memory map
        if item.ndim == 2:
            item = item[None]
        if item.dtype != np.uint8:
            item = item.astype(np.float32, copy=False)
        image = torch.from_numpy(item)
        target = UNLABELLED if self.targets is None else int(self.targets[index])
        return (self.transform(image) if self.transform is not None else image), target
