"""`dinov2-curate hash-dedup`: near-exact copy removal on the raw pool with a PCA hash.

Images -> thumbnails (resumable parts) -> PCA basis (fitted on a seeded sample of the pool, or
given) -> binary codes -> pairs within a Hamming radius (FAISS binary index) -> groups (see
groups.py; ``representative`` by default) -> the best member of each group is kept: largest
resolution, then a lossless file before a JPEG, then the higher JPEG quality, then the larger
file, then the earlier path.

Outputs in ``output_dir``: ``kept_paths.txt`` (the list the next stage, e.g. ``embed``, reads),
``paths.txt`` (decodable images, the row order of the arrays), ``codes.npy``, ``groups.npy``,
``representative.npy``, ``distance.npy`` (Hamming distance to the representative, -1 for kept
rows), ``keep.npy``, ``basis.npz``, ``errors.txt``, ``report.csv``, ``contact_sheet.png``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from . import pca_hash, report
from .arrays import CurationInputError, save_npy_atomic, write_lines_atomic
from .choices import GroupRule, choose
from .groups import best_first_order, group_rows, pair_graph
from .images import LOSSLESS_FORMATS, read_thumbnail
from .stage_state import StageResult, StageState, map_parts

STAGE = "hash-dedup"
OUTPUTS = ["kept_paths.txt", "paths.txt", "codes.npy", "groups.npy", "representative.npy", "distance.npy",
           "keep.npy", "basis.npz", "errors.txt", "report.csv"]


def _thumbnail_part(paths: list[str], thumb_size: int) -> dict:
    thumbs, ok, errors, meta = [], [], [], []
    for path in paths:
        thumb, info, error = read_thumbnail(path, thumb_size)
        if error:
            errors.append(f"{path}\t{error}")
            continue
        thumbs.append(thumb)
        ok.append(path)
        meta.append((info.pixels, int(info.format in LOSSLESS_FORMATS), info.jpeg_quality, info.file_size))
    return {
        "thumbs": np.stack(thumbs) if thumbs else np.empty((0, thumb_size, thumb_size), np.uint8),
        "paths": np.array(ok, dtype=str), "errors": np.array(errors, dtype=str),
        "meta": np.array(meta, dtype=np.int64).reshape(-1, 4),
    }


def quality_order(meta: np.ndarray) -> np.ndarray:
    """Best first: most pixels, lossless, higher JPEG quality, larger file, earlier row."""
    pixels, lossless, quality, size = meta.T
    return best_first_order(-pixels, -lossless, -quality, -size)


def hash_dedup_stage(
    images,
    output_dir,
    *,
    bits: int = 64,
    radius: int = 10,
    thumb_size: int = 16,
    factory: str = pca_hash.DEFAULT_FACTORY,
    search_params: str = "",
    rule: str = GroupRule.representative,
    basis: str | Path | None = None,
    fit_sample: int = 100_000,
    part_size: int = 4096,
    chunk_rows: int = 65536,
    seed: int = 0,
    contact_groups: int = 12,
    progress: bool = True,
) -> StageResult:
    from .embed import list_images

    paths = list_images(images)
    rule = choose(GroupRule, rule, "group rule")
    if basis is not None:
        loaded = pca_hash.PCAHashBasis.load(basis)
        bits, thumb_size = loaded.bits, loaded.thumb_size
    pca_hash.validate_bits(bits, thumb_size)
    pca_hash.validate_radius(radius, bits)
    pca_hash.make_binary_index(bits, factory, radius, search_params)  # a bad factory fails before any work
    if part_size < 1 or fit_sample <= bits:
        raise CurationInputError(f"part_size must be >= 1 and fit_sample > bits, got {part_size} and {fit_sample}")
    params = dict(bits=bits, radius=radius, thumb_size=thumb_size, factory=factory, search_params=search_params,
                  rule=rule, fit_sample=fit_sample, part_size=part_size, seed=seed,
                  paths_sha256=hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest())
    state = StageState(output_dir, STAGE, params, [basis] if basis is not None else [], OUTPUTS)
    if state.is_complete():
        return state.skipped_result()
    work = state.begin()
    out = Path(output_dir)
    parts = map_parts(paths, part_size, work / "thumbs", lambda part: _thumbnail_part(part, thumb_size),
                      progress=progress, desc="thumbnails")
    ok_paths = [str(p) for part in parts for p in part["paths"]]
    errors = [str(e) for part in parts for e in part["errors"]]
    write_lines_atomic(out / "errors.txt", errors)
    if not ok_paths:
        raise CurationInputError(f"none of the {len(paths)} images could be decoded; see {out / 'errors.txt'}")
    thumbs = np.concatenate([part["thumbs"] for part in parts])
    meta = np.concatenate([part["meta"] for part in parts])

    if basis is None:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(len(ok_paths), min(fit_sample, len(ok_paths)), replace=False))
        fitted = pca_hash.fit_basis(pca_hash.standardize(thumbs[sample]), bits, thumb_size)
    else:
        fitted = loaded
    codes = np.concatenate([pca_hash.encode(fitted, pca_hash.standardize(thumbs[s : s + chunk_rows]))
                            for s in range(0, len(ok_paths), chunk_rows)])
    first, second, distance = pca_hash.radius_pairs(codes, radius, factory=factory, search_params=search_params,
                                                    chunk_rows=chunk_rows, seed=seed, work_dir=work / "pairs",
                                                    progress=progress)
    groups = group_rows(pair_graph(first, second, distance, len(ok_paths)), quality_order(meta), rule)

    fitted.save(work / "basis.npz")
    (work / "basis.npz").replace(out / "basis.npz")
    save_npy_atomic(out / "codes.npy", codes)
    save_npy_atomic(out / "groups.npy", groups.group)
    save_npy_atomic(out / "representative.npy", groups.representative)
    save_npy_atomic(out / "distance.npy", np.where(np.isnan(groups.link), -1, groups.link).astype(np.int64))
    save_npy_atomic(out / "keep.npy", groups.keep)
    write_lines_atomic(out / "paths.txt", ok_paths)
    reason = f"near copy (Hamming distance <= {radius} of {bits} bits) of the kept image"
    sheet = report.publish_group_decisions(out, STAGE, ok_paths, groups, "hamming", reason,
                                           extra_rows=report.error_report_rows(STAGE, errors),
                                           contact_groups=contact_groups, link_format="{:.0f}")
    write_lines_atomic(out / "kept_paths.txt", [ok_paths[r] for r in groups.keep])
    summary = report.summary(len(paths), {"undecodable": len(errors), "near_copy": len(ok_paths) - groups.keep.size},
                             groups.keep.size)
    summary["groups_with_copies"] = int((np.bincount(groups.group) > 1).sum())
    summary["pairs_within_radius"] = int(first.size)
    summary["contact_sheet"] = str(sheet) if sheet else "none (no copies found)"
    return state.complete(summary)
