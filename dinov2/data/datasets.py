"""Unlabelled image sources: a folder, a manifest of paths, a .npy array.

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
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

UNLABELLED = -1


def image_extensions() -> Tuple[str, ...]:
    """Lower-case extensions of every format this PIL build can open."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def load_image(path: str, mode: Optional[str] = "RGB", path_manager: Optional[PathManager] = None) -> Image.Image:
    """Open and fully decode an image (so truncation is detected here, not later)."""
    pm = path_manager or g_pathmgr
    with pm.open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img.convert(mode) if mode is not None and img.mode != mode else img


def _is_hidden(name: str) -> bool:
    # Dot files include macOS "._x.jpg" resource forks, which are never real images.
    return name.startswith(".")


def _list_images(root: str, pm: PathManager, extensions: Sequence[str]) -> List[str]:
    found: List[str] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        for name in pm.ls(folder):
            if _is_hidden(name):
                continue
            path = os.path.join(folder, name)
            if pm.isdir(path):
                pending.append(path)
            elif os.path.splitext(name)[1].lower() in extensions:
                found.append(path)
    # Sorted so the index -> file mapping (and thus the sample stream) is stable.
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively), unlabelled.

    Any extension PIL can open is taken; other files and hidden entries are ignored.
    """

    def __init__(self, root: str, *, mode: Optional[str] = "RGB", path_manager: Optional[PathManager] = None):
        self.root = str(root)
        self.mode = mode
        self.path_manager = path_manager or g_pathmgr
        if not self.path_manager.exists(self.root):
            raise FileNotFoundError(f"image folder does not exist: {self.root}")
        if not self.path_manager.isdir(self.root):
            raise NotADirectoryError(f"not a folder: {self.root}")
        self.paths = _list_images(self.root, self.path_manager, image_extensions())
        if not self.paths:
            raise ValueError(f"no images found under {self.root} (searched recursively for files PIL can open)")
        logger.info("ImageFolderDataset: %d images under %s", len(self.paths), self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int):
        return load_image(self.paths[index], self.mode, self.path_manager), UNLABELLED


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
        with self.path_manager.open(self.manifest_path, "r") as f:
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
    """Images from a ``.npy`` array of shape (N, C, H, W) or (N, H, W), memory-mapped.

    Items are tensors (C, H, W) — (1, H, W) for a 3-D array — of dtype uint8 or
    float32 (any float array is returned as float32), so multi-band data (any C)
    flows straight into ``DataAugmentationDINO(num_channels=C)``. ``labels`` is an
    optional array-like or .npy path of N integers.
    """

    def __init__(self, path: str, labels: Union[None, str, Sequence[int], np.ndarray] = None, *,
                 path_manager: Optional[PathManager] = None):
        self.path = str(path)
        self.path_manager = path_manager or g_pathmgr
        if not self.path_manager.exists(self.path):
            raise FileNotFoundError(f"array file does not exist: {self.path}")
        self._local_path = self.path_manager.get_local_path(self.path)
        self._array: Optional[np.ndarray] = None
        array = self.array
        if array.ndim not in (3, 4):
            raise ValueError(f"{self.path}: expected shape (N, C, H, W) or (N, H, W), got {array.shape}")
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{self.path}: dtype {array.dtype} unsupported; store uint8 or float data")
        if len(array) == 0:
            raise ValueError(f"{self.path}: the array holds no images")
        if isinstance(labels, str):
            labels = np.load(self.path_manager.get_local_path(labels))
        self.targets = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.targets is not None and self.targets.shape != (len(array),):
            raise ValueError(f"{self.path}: {len(array)} images but labels of shape {self.targets.shape}")

    @property
    def array(self) -> np.ndarray:
        # Opened lazily so pickling to DataLoader workers sends a path, not the data.
        if self._array is None:
            self._array = np.load(self._local_path, mmap_mode="r")
        return self._array

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def __len__(self) -> int:
        return len(self.array)

    def describe(self, index: int) -> str:
        return f"{self.path}[{index}]"

    def __getitem__(self, index: int):
        item = np.array(self.array[index])  # copy out of the memory map
        if item.ndim == 2:
            item = item[None]
        if item.dtype != np.uint8:
            item = item.astype(np.float32, copy=False)
        target = UNLABELLED if self.targets is None else int(self.targets[index])
        return torch.from_numpy(item), target
