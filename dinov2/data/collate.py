"""Collate multi-crop samples into the packed SSL batch, with iBOT masks.

Output keys and the masking rule are those of the official dinov2
``collate_data_and_cast``; the randomness comes from an explicit ``rng`` so the
masks of a batch can be reproduced from (seed, batch position).

``global_batch_masks`` applies the same rule to the GLOBAL batch (all ranks together) while
each rank builds only the masks of its own images, so the masks of a global batch do not
depend on how many ranks share it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .masking import MaskingGenerator
from .seeding import RNGLike, rng_permutation, rng_uniform


def collate_data_and_cast(
    samples_list: Sequence[Tuple[Dict[str, Any], Any]],
    mask_ratio_tuple: Tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: Optional[int] = None,
    mask_generator: Optional[MaskingGenerator] = None,
    rng: Optional[RNGLike] = None,
) -> Dict[str, Any]:
    """Stack crops crop-major and build block-wise masks for the global crops.

    Args:
        samples_list: ``(crops_dict, target)`` pairs from ``DataAugmentationDINO``.
        mask_ratio_tuple: (min_ratio, max_ratio) of masked patches per masked image.
        mask_probability: fraction of global crops that get a (non-empty) mask.
        dtype: dtype the crops are cast to (masks stay bool, weights float32).
        n_tokens: patch tokens per global crop (= H * W of the mask grid).
        mask_generator: a ``MaskingGenerator`` over that grid.
        rng: numpy Generator or random.Random; None draws a fresh unseeded one
            (non-reproducible, kept only for drop-in use).

    Returns a dict with ``collated_global_crops`` [n_global*B, C, H, W] (all first
    global crops, then all second ones), ``collated_local_crops`` likewise,
    ``collated_masks`` [n_global*B, n_tokens] bool, ``mask_indices_list`` (flat
    indices of True entries), ``masks_weight`` (1 / masked count of the patch's row,
    one per masked patch, row-major), ``upperbound`` (int) and ``n_masked_patches``
    (LongTensor [1]).
    """
    if rng is None:
        rng = np.random.default_rng()
    global_crops, local_crops = stack_crops(samples_list)
    n_images = len(global_crops)
    n_masked_images, n_tokens = _check_masking(n_images, mask_probability, n_tokens, mask_generator)

    # Stratified ratios: image i draws its ratio from the i-th of n equal bins, so a
    # batch always spans the whole [min, max] range. float32 like the official code,
    # whose int() truncations we reproduce exactly.
    probs = torch.linspace(float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]), n_masked_images + 1)
    upperbound = 0
    masks = []
    for i in range(n_masked_images):
        lo, hi = probs[i], probs[i + 1]
        ratio = lo + (hi - lo) * rng_uniform(rng, 0.0, 1.0)
        masks.append(_as_flat_bool(mask_generator(int(n_tokens * ratio), rng=rng), n_tokens))
        upperbound += int(n_tokens * hi)
    empty = torch.zeros(n_tokens, dtype=torch.bool)
    masks.extend(empty.clone() for _ in range(n_masked_images, n_images))
    # Shuffle so which images (and which global crop) are masked is random.
    masks = [masks[j] for j in rng_permutation(rng, n_images)]
    return assemble_batch(global_crops, local_crops, masks, n_tokens, upperbound, dtype)


def stack_crops(samples_list: Sequence[Tuple[Dict[str, Any], Any]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(global [n_global*B, C, H, W], local [n_local*B, C, h, w])`` in crop-major order (all first
    crops, then all second ones): the model splits the batch back per crop with chunk()."""
    first = samples_list[0][0]
    n_global = len(first["global_crops"])
    n_local = len(first["local_crops"])
    global_crops = torch.stack([s[0]["global_crops"][i] for i in range(n_global) for s in samples_list])
    if n_local > 0:
        local_crops = torch.stack([s[0]["local_crops"][i] for i in range(n_local) for s in samples_list])
    else:
        local_crops = torch.empty((0,) + tuple(global_crops.shape[1:2]) + (0, 0), dtype=global_crops.dtype)
    return global_crops, local_crops


def _check_masking(n_images: int, mask_probability: float, n_tokens: Optional[int],
                   mask_generator: Optional[MaskingGenerator]) -> Tuple[int, int]:
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    n_masked_images = int(n_images * mask_probability)
    if n_masked_images > 0 and (n_tokens is None or mask_generator is None):
        raise ValueError("n_tokens and mask_generator are required when mask_probability > 0")
    if n_tokens is None:
        n_tokens = mask_generator.num_patches if mask_generator is not None else 0
    if mask_generator is not None and mask_generator.num_patches != n_tokens:
        raise ValueError(f"n_tokens={n_tokens} does not match the mask grid {mask_generator.get_shape()}")
    return n_masked_images, n_tokens


def assemble_batch(global_crops: torch.Tensor, local_crops: torch.Tensor, masks: List[torch.Tensor], n_tokens: int,
                   upperbound: int, dtype: torch.dtype) -> Dict[str, Any]:
    """The batch dict of ``collate_data_and_cast`` from stacked crops and one flat mask per global crop."""
    collated_masks = torch.stack(masks) if masks else torch.zeros((0, n_tokens), dtype=torch.bool)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    row_counts = collated_masks.sum(-1).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / row_counts).unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }


def global_batch_masks(
    slots: Sequence[int],
    n_images: int,
    mask_ratio_tuple: Tuple[float, float],
    mask_probability: float,
    n_tokens: Optional[int],
    mask_generator: Optional[MaskingGenerator],
    rng_for: Callable[[Optional[int]], np.random.Generator],
) -> Tuple[List[torch.Tensor], int]:
    """Masks of the global crops at ``slots`` of a global batch of ``n_images`` global crops.

    The official rule applied to the whole global batch: ``int(n_images * mask_probability)``
    crops are masked, the k-th drawing its ratio from the k-th of that many equal bins of
    ``mask_ratio_tuple``, and a random permutation decides which slot gets which bin. Only the
    permutation is drawn for the whole global batch (``rng_for(None)``, a few ms for 10^5 crops);
    the mask of bin k is drawn from its own stream ``rng_for(k)``, so each rank builds just the
    masks of its own crops and the result does not depend on how the batch is split.

    Returns (one flat bool mask per slot, ``upperbound`` over these slots).
    """
    n_masked_images, n_tokens = _check_masking(n_images, mask_probability, n_tokens, mask_generator)
    bins = rng_for(None).permutation(n_images) if n_masked_images > 0 else None
    probs = torch.linspace(float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]), n_masked_images + 1)
    empty = torch.zeros(n_tokens, dtype=torch.bool)
    masks, upperbound = [], 0
    for slot in slots:
        if not 0 <= slot < n_images:
            raise ValueError(f"mask slot {slot} is outside the global batch of {n_images} crops")
        k = int(bins[slot]) if bins is not None else n_masked_images
        if k >= n_masked_images:
            masks.append(empty.clone())
            continue
        rng = rng_for(k)
        lo, hi = probs[k], probs[k + 1]
        ratio = lo + (hi - lo) * rng_uniform(rng, 0.0, 1.0)
        masks.append(_as_flat_bool(mask_generator(int(n_tokens * ratio), rng=rng), n_tokens))
        upperbound += int(n_tokens * hi)
    return masks, upperbound


def _as_flat_bool(mask: np.ndarray, n_tokens: int) -> torch.Tensor:
    flat = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).flatten()
    if flat.numel() != n_tokens:
        raise ValueError(f"mask generator returned {flat.numel()} patches, expected n_tokens={n_tokens}")
    return flat
