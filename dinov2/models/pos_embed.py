"""Position-embedding resampling as a pure function (any image size, rectangular too)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def resample_patch_pos_embed(
    patch_pos_embed: Tensor,
    grid_size: tuple[int, int],
    *,
    interpolate_offset: float = 0.1,
    antialias: bool = False,
) -> Tensor:
    """Bicubic resampling of a square ``[1, M*M, D]`` grid of embeddings to ``grid_size`` (h, w).

    With ``interpolate_offset > 0`` the released models pass ``scale_factor = (h + offset) / M``
    instead of a target size: the output size is still (h, w) but the sampling positions differ
    slightly, and the released weights were trained with exactly this (offset 0.1 for the
    original models, 0.0 with antialiasing for the ``_reg`` ones). Computed in float32.
    """
    num_patches, dim = patch_pos_embed.shape[1], patch_pos_embed.shape[2]
    side = int(math.sqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"position embedding holds {num_patches} patches, not a square grid")
    height, width = grid_size
    grid = patch_pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if interpolate_offset:
        scale = ((height + interpolate_offset) / side, (width + interpolate_offset) / side)
        resized = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        resized = F.interpolate(grid, size=(height, width), mode="bicubic", antialias=antialias)
    if tuple(resized.shape[-2:]) != (height, width):
        raise RuntimeError(f"resampled grid is {tuple(resized.shape[-2:])}, expected {(height, width)}")
    return resized.permute(0, 2, 3, 1).reshape(1, height * width, dim)
