"""The `embed` stage: one process embeds the whole pool or one shard ``i/n`` of it.

Outputs: ``embeddings.npy`` (unit rows), ``paths.txt`` (line i = row i) and ``errors.txt``
(undecodable images, ``path<TAB>error``). A shard writes the same files under
``OUTPUT_DIR/shards/iiiii-of-nnnnn/``; :mod:`data_curation.shards` checks a shard set and
merges it (an explicit, idempotent step) and runs all shards as a job array.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .arrays import AtomicNpyWriter, CurationInputError, read_lines, save_npy_atomic, write_lines_atomic
from .choices import EmbeddingDtype, choose
from .stage_state import StageResult, StageState

EMBED_OUTPUTS = ["embeddings.npy", "paths.txt", "errors.txt"]


def shard_dir(output_dir: str | Path, index: int, count: int) -> Path:
    return Path(output_dir) / "shards" / f"{index:05d}-of-{count:05d}"


def paths_digest(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode(errors="surrogateescape")).hexdigest()


def validate_embed_options(image_size: int, resize_size: int, dtype: str, part_size: int, batch_size: int) -> None:
    """Every check that needs no image and no model, so a bad option fails before any work."""
    from . import embed

    embed.make_transform(image_size, resize_size)
    choose(EmbeddingDtype, dtype, "embedding dtype")
    if part_size < 1 or batch_size < 1:
        raise CurationInputError(f"part_size and batch_size must be >= 1, got {part_size} and {batch_size}")


def validate_shard_count(count: int, num_images: int) -> None:
    if count > num_images:
        raise CurationInputError(f"--shard */{count}: more shards than the {num_images} images; use n <= {num_images}")


def embed_stage(
    images: str | Path,
    output_dir: str | Path,
    *,
    backbone: str = "dinov2_vits14",
    weights: str | None = "LVD142M",
    shard: tuple[int, int] | None = None,
    model=None,
    backbone_kwargs: dict | None = None,
    image_size: int = 224,
    resize_size: int = 256,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    dtype: str = EmbeddingDtype.float32,
    part_size: int = 4096,
    progress: bool = True,
) -> StageResult:
    """Embed every image (or shard ``i/n`` of them) -> embeddings.npy, paths.txt, errors.txt.

    With ``shard`` the outputs go to ``output_dir/shards/iiiii-of-nnnnn/``; nothing is merged
    here: ``dinov2-curate embed-merge`` (:func:`data_curation.shards.merge_embed_shards`) checks
    that every shard finished and concatenates them in order.
    ``model`` (an nn.Module) replaces the named backbone, e.g. for a custom feature extractor.
    """
    import torch  # only this stage needs torch; the others start fast without it

    from . import embed

    all_paths = embed.list_images(images)
    validate_embed_options(image_size, resize_size, dtype, part_size, batch_size)
    target_dir, paths = Path(output_dir), all_paths
    if shard is not None:
        validate_shard_count(shard[1], len(all_paths))
        paths = all_paths[embed.shard_slice(len(all_paths), shard)]
        target_dir = shard_dir(output_dir, *shard)
    weights_file = [weights] if weights and Path(str(weights)).is_file() else []
    params = dict(
        backbone=backbone if model is None else f"custom:{type(model).__name__}", weights=str(weights),
        backbone_kwargs=backbone_kwargs or {}, image_size=image_size, resize_size=resize_size, dtype=dtype,
        part_size=part_size, paths_sha256=paths_digest(paths),
    )
    if shard is not None:  # lets the merge check that every shard cut the same pool the same way
        params.update(shard=f"{shard[0]}/{shard[1]}", pool_sha256=paths_digest(all_paths))
    state = StageState(target_dir, "embed", params, weights_file, EMBED_OUTPUTS)
    if state.is_complete():
        return state.skipped_result()
    work = state.begin()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model is None:
        model = embed.load_model(backbone, weights, **(backbone_kwargs or {}))
    parts = list(embed.iter_parts(len(paths), part_size))
    for number, part in tqdm(parts, desc="embed", unit="part", disable=not progress):
        done = work / f"part_{number:06d}.npy"
        if done.is_file():
            continue
        out = embed.embed_paths(
            model, paths[part], image_size=image_size, resize_size=resize_size, batch_size=batch_size,
            num_workers=num_workers, device=device, dtype=dtype, progress=False,
        )
        write_lines_atomic(work / f"part_{number:06d}.paths.txt", out.paths)
        write_lines_atomic(work / f"part_{number:06d}.errors.txt", [f"{p}\t{e}" for p, e in out.errors])
        save_npy_atomic(done, out.embeddings)  # written last: its presence marks the part done
    summary = concatenate_parts(work, len(parts), target_dir)
    summary["images"] = len(paths)
    return state.complete(summary)


def concatenate_parts(folder: Path, num_parts: int, target_dir: Path, prefix: str = "part_") -> dict:
    """Concatenate ``part_*.npy`` / ``.paths.txt`` / ``.errors.txt`` into the final outputs."""
    arrays = [np.load(folder / f"{prefix}{n:06d}.npy", mmap_mode="r") for n in range(num_parts)]
    paths = [line for n in range(num_parts) for line in read_lines_or_empty(folder / f"{prefix}{n:06d}.paths.txt")]
    errors = [line for n in range(num_parts) for line in read_lines_or_empty(folder / f"{prefix}{n:06d}.errors.txt")]
    return publish_embeddings(arrays, paths, errors, target_dir)


def publish_embeddings(arrays: Sequence[np.ndarray], paths: list[str], errors: list[str], target_dir: Path) -> dict:
    """Write the concatenation of ``arrays`` (memory-mapped, block by block), paths.txt, errors.txt."""
    total = sum(a.shape[0] for a in arrays)
    dims = {a.shape[1] for a in arrays if a.shape[0]}
    target_dir.mkdir(parents=True, exist_ok=True)
    write_lines_atomic(target_dir / "errors.txt", errors)
    if total == 0:
        raise CurationInputError(
            f"none of the images could be decoded; see {target_dir / 'errors.txt'} for the reasons"
        )
    if len(dims) != 1:
        raise CurationInputError(f"the parts to concatenate have different dimensions {sorted(dims)}")
    dim = dims.pop()
    dtype = next(a.dtype for a in arrays if a.shape[0])
    writer = AtomicNpyWriter(target_dir / "embeddings.npy", (total, dim), dtype)
    try:
        row = 0
        for array in arrays:
            if not array.shape[0]:  # a part where every image failed
                continue
            writer.array[row : row + array.shape[0]] = array
            row += array.shape[0]
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    write_lines_atomic(target_dir / "paths.txt", paths)
    return {"embedded": total, "errors": len(errors), "dim": dim}


def read_lines_or_empty(path: Path) -> list[str]:
    return read_lines(path) if path.stat().st_size else []
