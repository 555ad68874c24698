"""Array I/O and input validation shared by every curation stage.

Embedding pools can be larger than RAM, so everything here works on memory-mapped
``.npy`` files in row chunks. Writes go to a temporary file in the destination folder and
are moved into place with ``os.replace``, so a killed process never leaves a half-written
output under its final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

DEFAULT_CHUNK_ROWS = 65536


class CurationInputError(ValueError):
    """Bad user input (file, array, parameter); the message names the problem and what
    was expected. The CLI turns it into a one-line error and a non-zero exit."""


# ----------------------------------------------------------------------------- writing


def _temp_path_beside(path: Path, suffix: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    # mkstemp creates the file 0600; give the published file the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """np.save to a temp file beside ``path`` then rename: readers see old or new, never half."""
    path = Path(path)
    tmp = _temp_path_beside(path, ".tmp.npy")
    try:
        np.save(tmp, np.asarray(array))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = _temp_path_beside(path, ".tmp")
    try:
        # surrogateescape: a file name that is not valid UTF-8 (os.fsdecode of its bytes)
        # is written as its original bytes, and read_lines gives back the same str.
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_lines_atomic(path: str | os.PathLike, lines: Sequence[str]) -> Path:
    return write_text_atomic(path, "".join(f"{line}\n" for line in lines))


class AtomicNpyWriter:
    """Fill a large ``.npy`` row block by row block through a memmap, then publish it.

    Used to concatenate per-part outputs into one array without holding it in RAM.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype):
        self.path = Path(path)
        self._tmp = _temp_path_beside(self.path, ".tmp.npy")
        self.array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=dtype, shape=shape)

    def commit(self) -> Path:
        self.array.flush()
        del self.array
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if hasattr(self, "array"):
            del self.array
        self._tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a text file (paths.txt, list files), without trailing newlines."""
    path = Path(path)
    if not path.is_file():
        raise CurationInputError(f"file not found: {path} (expected a text file, one entry a line)")
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    return [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]


def load_array(path: str | os.PathLike, what: str = "array") -> np.ndarray:
    """Memory-map a ``.npy`` file (never loads it whole)."""
    path = Path(path)
    if not path.is_file():
        raise CurationInputError(f"{what} file not found: {path} (expected a .npy file)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CurationInputError(f"{what} file {path} is not a readable .npy array: {exc}") from exc


def load_indices(path: str | os.PathLike, num_rows: int | None = None, what: str = "selection") -> np.ndarray:
    """A 1-D integer index file, checked against the pool size when known."""
    array = np.asarray(load_array(path, what))
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise CurationInputError(
            f"{what} file {path} must be a 1-D integer array of row indices, "
            f"got shape {array.shape} dtype {array.dtype}"
        )
    if num_rows is not None and array.size and (array.min() < 0 or array.max() >= num_rows):
        raise CurationInputError(
            f"{what} file {path} has row indices outside [0, {num_rows}) "
            f"(min {array.min()}, max {array.max()}); was it made from another pool?"
        )
    return array.astype(np.int64, copy=False)


def iter_row_chunks(num_rows: int, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[int, int]]:
    for start in range(0, num_rows, chunk_rows):
        yield start, min(start + chunk_rows, num_rows)


def shard_slice(num_items: int, shard: tuple[int, int]) -> slice:
    """Contiguous block of shard i of n (sizes differ by at most one), so that
    concatenating the shards in order gives back the full sorted list."""
    index, count = shard
    bounds = np.linspace(0, num_items, count + 1).round().astype(int)
    return slice(int(bounds[index]), int(bounds[index + 1]))


def normalized_rows(block: np.ndarray) -> np.ndarray:
    """float32 copy of ``block`` with unit-L2 rows (inner product == cosine)."""
    block = np.asarray(block, dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / norms


# ----------------------------------------------------------------------------- validation


def validate_embeddings(array: np.ndarray, name: str = "embeddings", chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
    """2-D float, at least one row, every row finite and non-zero (checked in chunks)."""
    if not isinstance(array, np.ndarray):
        raise CurationInputError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise CurationInputError(
            f"{name} must be a 2-D float array (rows x dim), got shape {array.shape} dtype {array.dtype}"
        )
    if array.shape[0] == 0:
        raise CurationInputError(f"{name} is empty (0 rows); expected at least one row")
    if array.shape[1] == 0:
        raise CurationInputError(f"{name} has dimension 0; expected at least one column")
    bad_rows: list[np.ndarray] = []
    for start, stop in iter_row_chunks(array.shape[0], chunk_rows):
        block = np.asarray(array[start:stop], dtype=np.float32)
        bad = ~np.isfinite(block).all(axis=1) | ~(np.abs(block).max(axis=1) > 0)
        if bad.any():
            bad_rows.append(np.flatnonzero(bad) + start)
    if bad_rows:
        rows = np.concatenate(bad_rows)
        raise CurationInputError(
            f"{name} has {rows.size} rows that are NaN/inf or all zeros (first: row {int(rows[0])}); "
            "expected finite, non-zero rows"
        )


def validate_same_dim(queries: np.ndarray, pool: np.ndarray, queries_name: str, pool_name: str = "embeddings") -> None:
    if queries.shape[1] != pool.shape[1]:
        raise CurationInputError(
            f"{queries_name} have dimension {queries.shape[1]} but {pool_name} have dimension "
            f"{pool.shape[1]}; both must come from the same backbone"
        )


def validate_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (-1.0 <= threshold <= 1.0):
        raise CurationInputError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    return threshold


def validate_k(k: int, pool_rows: int, *, excluding_self: bool = False) -> int:
    if int(k) != k or k < 1:
        raise CurationInputError(f"k must be a positive integer, got {k}")
    limit = pool_rows - 1 if excluding_self else pool_rows
    if k > limit:
        what = "other rows in the pool" if excluding_self else "rows in the pool"
        raise CurationInputError(f"k={k} is larger than the {limit} {what}; use k <= {limit}")
    return int(k)
