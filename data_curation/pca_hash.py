"""PCA hash: a short binary code per image for near-exact copy removal (DINOv2 paper, data
pipeline: "PCA hash deduplication" before embedding).

Each image becomes a small grayscale thumbnail (``thumb_size`` x ``thumb_size``, box-filtered),
standardised per image (zero mean, unit variance: brightness and contrast changes do not
matter), projected on the first ``bits`` principal components of a sample of the pool, and
each projection is binarised at its median over that sample (so every bit splits the pool in
half). Re-encodes, rescales and small border crops change few bits; unrelated images differ
in about half of them. Codes within a Hamming radius are then found with a FAISS binary index.

Binary indexes by factory string (``faiss.index_binary_factory``):
- ``BFlat``: exact, every pair compared (small pools, up to a few million codes);
- ``BHash{n}x{b}`` (multi-index hashing, ``n`` substrings of ``b`` bits, ``n*b == bits``): exact
  for a radius r when each substring is searched with ``r // n`` bit flips (set here), and
  far faster for large pools;
- ``BIVF{nlist}``: approximate, ``nprobe`` through ``search_params``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from .arrays import CurationInputError, iter_row_chunks

DEFAULT_FACTORY = "BFlat"


def standardize(thumbnails: np.ndarray) -> np.ndarray:
    """[n, s, s] uint8 -> [n, s*s] float32 rows with zero mean and unit variance (flat images
    stay all zeros)."""
    x = np.asarray(thumbnails, dtype=np.float32).reshape(len(thumbnails), -1)
    x = x - x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    return x / np.maximum(std, 1e-3)


@dataclass
class PCAHashBasis:
    mean: np.ndarray  # [D]
    components: np.ndarray  # [bits, D], first principal components
    thresholds: np.ndarray  # [bits], median projection over the fitting sample
    thumb_size: int

    @property
    def bits(self) -> int:
        return int(self.components.shape[0])

    def save(self, path: str | Path) -> None:
        np.savez(path, mean=self.mean, components=self.components, thresholds=self.thresholds,
                 thumb_size=np.int64(self.thumb_size))

    @classmethod
    def load(cls, path: str | Path) -> "PCAHashBasis":
        try:
            with np.load(path) as data:
                return cls(data["mean"], data["components"], data["thresholds"], int(data["thumb_size"]))
        except (OSError, KeyError, ValueError) as exc:
            raise CurationInputError(f"{path} is not a PCA-hash basis (.npz with mean, components, thresholds, thumb_size): {exc}") from exc


def validate_bits(bits: int, thumb_size: int) -> int:
    if int(bits) != bits or bits < 8 or bits % 8:
        raise CurationInputError(f"hash bits must be a positive multiple of 8 (64 or 128 are usual), got {bits}")
    if bits > thumb_size * thumb_size:
        raise CurationInputError(f"{bits} hash bits need a thumbnail of at least {bits} pixels; "
                                 f"thumb_size {thumb_size} gives {thumb_size * thumb_size}")
    return int(bits)


def validate_radius(radius: int, bits: int) -> int:
    """0 <= radius < bits / 2: at half the bits, two unrelated images already match."""
    if int(radius) != radius or not 0 <= radius < bits / 2:
        raise CurationInputError(
            f"Hamming radius must be an integer in [0, {bits // 2 - 1}] for {bits}-bit codes "
            f"(unrelated images differ in about {bits // 2} bits), got {radius}"
        )
    return int(radius)


def fit_basis(sample: np.ndarray, bits: int, thumb_size: int) -> PCAHashBasis:
    """PCA of standardised thumbnails ``sample`` [n, s*s]; needs more rows than bits."""
    validate_bits(bits, thumb_size)
    sample = np.asarray(sample, dtype=np.float64)
    if sample.shape[0] <= bits:
        raise CurationInputError(
            f"fitting a {bits}-bit PCA hash needs more than {bits} decodable images, got {sample.shape[0]}; "
            "use fewer bits or a basis fitted on a larger pool (--basis basis.npz)"
        )
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    components = vt[:bits]
    # Fix each component's sign (SVD's is arbitrary) so that a basis is reproducible.
    signs = np.sign(components[np.arange(bits), np.argmax(np.abs(components), axis=1)])
    components = components * signs[:, None]
    thresholds = np.median((sample - mean) @ components.T, axis=0)
    return PCAHashBasis(mean.astype(np.float32), components.astype(np.float32), thresholds.astype(np.float32), thumb_size)


def encode(basis: PCAHashBasis, standardized: np.ndarray) -> np.ndarray:
    """[n, s*s] -> packed binary codes [n, bits / 8] uint8 (FAISS binary layout)."""
    if standardized.shape[1] != basis.mean.size:
        raise CurationInputError(
            f"thumbnails have {standardized.shape[1]} pixels but the basis expects {basis.mean.size} "
            f"(thumb_size {basis.thumb_size})"
        )
    projection = (np.asarray(standardized, dtype=np.float32) - basis.mean) @ basis.components.T
    return np.packbits(projection > basis.thresholds, axis=1)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between packed codes (rows of ``a`` and ``b``, broadcast)."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)


def make_binary_index(bits: int, factory: str, radius: int, search_params: str = "") -> faiss.IndexBinary:
    """Empty binary index; multi-hash indexes get the bit flips that make them exact at ``radius``."""
    try:
        index = faiss.index_binary_factory(int(bits), factory)
    except RuntimeError as exc:
        raise CurationInputError(
            f"invalid FAISS binary factory string {factory!r} for {bits}-bit codes "
            "(expected e.g. 'BFlat', 'BHash4x16' for 64 bits, 'BIVF1024')"
        ) from exc
    typed = faiss.downcast_IndexBinary(index)
    index.this.disown()  # the downcast proxy owns the C++ object from now on
    typed.this.own(True)
    index = typed
    if isinstance(index, faiss.IndexBinaryHNSW):
        raise CurationInputError(f"binary index {factory!r} has no range search; use BFlat, BHash{{n}}x{{b}} or BIVF{{nlist}}")
    if isinstance(index, faiss.IndexBinaryMultiHash):
        index.nflip = radius // index.nhash
    for assignment in filter(None, (part.strip() for part in search_params.split(","))):
        match = re.fullmatch(r"(\w+)=(\d+)", assignment)
        if not match or not hasattr(index, match.group(1)):
            raise CurationInputError(f"invalid binary-index search parameter {assignment!r} for {factory} (e.g. nprobe=16 for BIVF)")
        setattr(index, match.group(1), int(match.group(2)))
    return index


def radius_pairs(
    codes: np.ndarray,
    radius: int,
    *,
    factory: str = DEFAULT_FACTORY,
    search_params: str = "",
    chunk_rows: int = 65536,
    seed: int = 0,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of rows whose codes differ in at most ``radius`` bits:
    (i, j, Hamming distance), each int64. With ``work_dir`` finished query chunks are kept, so a
    killed search resumes."""
    bits = codes.shape[1] * 8
    radius = validate_radius(radius, bits)
    index = make_binary_index(bits, factory, radius, search_params)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(codes.shape[0], min(codes.shape[0], 200_000), replace=False))
        index.train(np.ascontiguousarray(codes[sample]))
    for start, stop in iter_row_chunks(codes.shape[0], chunk_rows):
        index.add(np.ascontiguousarray(codes[start:stop]))
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    firsts, seconds, distances = [], [], []
    chunks = list(iter_row_chunks(codes.shape[0], chunk_rows))
    for number, (start, stop) in enumerate(tqdm(chunks, desc=f"hamming {factory}", unit="chunk", disable=not progress)):
        part = Path(work_dir) / f"pairs_{number:06d}.npz" if work_dir is not None else None
        if part is not None and part.is_file():
            with np.load(part) as saved:
                i, j, d = saved["i"], saved["j"], saved["d"]
        else:
            # FAISS binary range search returns distances strictly below its radius argument.
            lims, d, j = index.range_search(np.ascontiguousarray(codes[start:stop]), radius + 1)
            i = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims.astype(np.int64)))
            j, d = j.astype(np.int64), d.astype(np.int64)
            other = i != j  # a pair found from both of its rows is merged later (approximate indexes may find one side only)
            i, j, d = np.minimum(i, j)[other], np.maximum(i, j)[other], d[other]
            if part is not None:
                tmp = part.with_suffix(".tmp.npz")
                np.savez(tmp, i=i, j=j, d=d)
                tmp.replace(part)
        firsts.append(i), seconds.append(j), distances.append(d)
    if not firsts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    i, j, d = np.concatenate(firsts), np.concatenate(seconds), np.concatenate(distances)
    _, unique = np.unique(i * codes.shape[0] + j, return_index=True)
    return i[unique], j[unique], d[unique]
