"""Image files, one rule each for which files are images and how one is decoded.

Training (``data/datasets.py``), evaluation (``eval/data.py``) and curation
(``data_curation/embed.py``) all list and decode through this module.

Listing (``list_image_files``): every file under a folder whose extension a PIL
decoder opens (``image_extensions``), recursively, hidden entries (names starting
with ``.``, e.g. macOS ``._x.jpg`` forks) left out, sorted. The walk follows
directory symlinks but never enters a real directory twice (visited set of
``(st_dev, st_ino)``), so ``ln -s . DIR/loop`` or two mutual loops terminate; it takes
regular files only (a FIFO or socket named ``x.jpg`` is passed over, it would block a
reader forever) and lists each real file once (hard links and file symlinks to a file
already listed are dropped). Real paths win over symlinked ones: the real tree is
walked first, symlinks after it.

Decoding (``load_image`` / ``to_8bit``): the file is fully decoded (so a truncated file
fails here, where callers skip it) and high bit depths are scaled to 8 bits instead of
being saturated by PIL's ``convert``: 16-bit modes ``I;16*`` and ``I`` (what PIL gives
16-bit PNG/TIFF files) map 0..65535 to 0..255 (``round(v * 255 / 65535)``); ``F``
(32-bit float) follows the float-image convention of 0..1 -> 0..255. Values outside
those ranges are an error naming them (never silently clipped).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import stat
from typing import Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
from iopath.common.file_io import PathManager, g_pathmgr
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
FLOAT_MODES = ("F",)
_UINT16_MAX = 65535


# ----------------------------------------------------------------------------- which files


@functools.lru_cache(maxsize=1)
def image_extensions() -> Tuple[str, ...]:
    """Lower-case extensions of every format this PIL build can open and decode
    (stub formats such as HDF5 or GRIB, which need an external handler, are left out)."""
    Image.init()
    decodable = {
        fmt for fmt, (factory, _) in Image.OPEN.items()
        if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    }
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in decodable))


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str, extensions: Optional[Iterable[str]] = None) -> bool:
    """Not hidden and ending in one of ``extensions`` (default ``image_extensions()``)."""
    exts = image_extensions() if extensions is None else tuple(e.lower() for e in extensions)
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in exts


def _is_uri(path: str) -> bool:
    return "://" in path


def list_image_files(root: str | os.PathLike, *, extensions: Optional[Sequence[str]] = None,
                     path_manager: Optional[PathManager] = None) -> List[str]:
    """Sorted image paths under ``root`` (paths start with ``root`` as given).

    Local folders are walked with ``os.scandir`` (cycle-safe, regular files only, each
    real file once); a URI (``s3://...``) is listed through ``path_manager`` (default
    ``g_pathmgr``), whose stores have no symlinks. A missing ``root`` is an error; an
    unreadable sub-folder is logged and passed over.
    """
    root = os.fspath(root)
    exts = image_extensions() if extensions is None else tuple(e.lower() for e in extensions)
    if _is_uri(root):
        return _list_with_path_manager(root, path_manager or g_pathmgr, exts)
    return _list_local(root, exts)


def _list_local(root: str, exts: Tuple[str, ...]) -> List[str]:
    root_stat = os.stat(root)  # FileNotFoundError / PermissionError name the root
    if not stat.S_ISDIR(root_stat.st_mode):
        raise NotADirectoryError(f"not a folder: {root}")
    seen_dirs: Set[Tuple[int, int]] = set()
    seen_files: Set[Tuple[int, int]] = set()
    found: List[str] = []
    links: collections.deque = collections.deque()  # symlinked entries, taken after the real tree

    def walk(folder: str, key: Tuple[int, int]) -> None:
        pending = [(folder, key)]
        while pending:
            current, current_key = pending.pop()
            if current_key in seen_dirs:
                continue
            seen_dirs.add(current_key)
            try:
                entries = sorted(os.scandir(current), key=lambda e: e.name)
            except OSError as exc:
                logger.warning("skipping unreadable folder %s: %s", current, exc)
                continue
            subfolders: list = []
            for entry in entries:
                if is_hidden(entry.name):
                    continue
                if entry.is_symlink():
                    links.append(entry.path)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                take(entry.path, st, subfolders)
            pending.extend(reversed(subfolders))  # popped in sorted order: a sorted pre-order walk

    def take(path: str, st: os.stat_result, pending: list) -> None:
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            pending.append((path, key))
        elif stat.S_ISREG(st.st_mode) and os.path.splitext(path)[1].lower() in exts and key not in seen_files:
            seen_files.add(key)
            found.append(path)

    walk(root, (root_stat.st_dev, root_stat.st_ino))
    while links:
        link = links.popleft()
        try:
            st = os.stat(link)  # follows the link; a dangling link is passed over
        except OSError:
            continue
        pending: list = []
        take(link, st, pending)
        for folder, key in pending:
            walk(folder, key)
    # Sorted so the index -> file mapping (and thus the sample stream) is stable.
    return sorted(found)


def _list_with_path_manager(root: str, pm: PathManager, exts: Tuple[str, ...]) -> List[str]:
    if not pm.exists(root):
        raise FileNotFoundError(f"image folder does not exist: {root}")
    found: List[str] = []
    pending, seen = [root], set()
    while pending:
        folder = pending.pop()
        if folder in seen:
            continue
        seen.add(folder)
        for name in pm.ls(folder):
            if is_hidden(name):
                continue
            path = folder.rstrip("/") + "/" + name
            if pm.isdir(path):
                pending.append(path)
            elif os.path.splitext(name)[1].lower() in exts:
                found.append(path)
    return sorted(found)


# ----------------------------------------------------------------------------- decoding


def to_8bit(img: Image.Image) -> Image.Image:
    """``img`` with 8 bits per channel: 16-bit and float modes scaled (see module doc),
    every other mode returned as is."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img)
        lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
        if lo < 0 or hi > _UINT16_MAX:
            raise ValueError(f"mode {img.mode} image has values in [{lo}, {hi}]; expected 16-bit data in [0, 65535]")
        scaled = values.astype(np.float64) * (255.0 / _UINT16_MAX)
    elif img.mode in FLOAT_MODES:
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"mode {img.mode} image holds NaN or inf values")
        lo, hi = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"mode {img.mode} image has values in [{lo:.4g}, {hi:.4g}]; expected floats in [0, 1]")
        scaled = values * 255.0
    else:
        return img
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def decode_image(img: Image.Image, mode: Optional[str] = "RGB") -> Image.Image:
    """Fully decode an opened image, bring it to 8 bits, then to ``mode`` (None: keep channels)."""
    img.load()
    img = to_8bit(img)
    return img.convert(mode) if mode is not None and img.mode != mode else img


def load_image(path: str, mode: Optional[str] = "RGB", path_manager: Optional[PathManager] = None) -> Image.Image:
    """Open and fully decode an image file through ``path_manager`` (default ``g_pathmgr``):
    truncation is detected here, not later, and high bit depths are scaled to 8 bits."""
    pm = path_manager or g_pathmgr
    with pm.open(path, "rb") as f:
        return decode_image(Image.open(f), mode)
