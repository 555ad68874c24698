"""Stochastic depth (Huang et al. 2016) over packed token tensors.

For high drop rates DINOv2 does not multiply a residual branch by zero: it runs the branch only
on the kept images and adds the result back scaled by ``batch / kept`` (so the expectation of
the update is unchanged), which saves the dropped images' compute.

Both paths are free of host synchronisation (no tensors built from Python lists, no reads of
device values) and of per-token scale tensors: the subset path adds each crop group's residual
in place with ``index_add_(..., alpha=batch / kept)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .packing import PackLayout

# Above this rate the branch runs on a subset of the images (compute is skipped).
SUBSET_DROP_THRESHOLD = 0.1


def drop_path_per_image(residual: Tensor, layout: PackLayout, drop_prob: float) -> Tensor:
    """Zero each image's residual with probability ``drop_prob``; scale survivors by 1/keep."""
    if drop_prob <= 0.0:
        return residual
    keep = 1.0 - drop_prob
    keep_mask = residual.new_empty(len(layout.sequence_lengths)).bernoulli_(keep).div_(keep)
    if len(layout.groups) == 1:
        batch, tokens = layout.groups[0]
        return (residual.view(batch, tokens, -1) * keep_mask[:, None, None]).view_as(residual)
    scaled = [
        group * image_scale[:, None, None]
        for group, image_scale in zip(layout.split(residual), keep_mask.split([b for b, _ in layout.groups]))
    ]
    return torch.cat([s.flatten(0, 1) for s in scaled])


def kept_images(layout: PackLayout, drop_prob: float, device: torch.device) -> list[Tensor]:
    """Per crop group, ``max(int(b * (1 - drop_prob)), 1)`` random image indices out of its ``b``."""
    return [torch.randperm(batch, device=device)[: max(int(batch * (1.0 - drop_prob)), 1)]
            for batch, _ in layout.groups]


def add_residual_on_kept_subset(
    x: Tensor,
    layout: PackLayout,
    residual_fn: Callable[[Tensor, PackLayout], Tensor],
    drop_prob: float,
    *,
    inplace: bool = False,
) -> Tensor:
    """``x + residual_fn(x)`` where, in each crop group, only a random subset of images runs.

    Of each group's ``b`` images ``max(int(b * (1 - drop_prob)), 1)`` are kept; their residual
    is scaled by ``b / kept``; the other images pass through untouched. With ``inplace`` the
    sum is written into ``x`` (the caller must own ``x``: nothing else may need its old value),
    else into a copy of it.
    """
    images = kept_images(layout, drop_prob, x.device)
    token_index, subset_layout = layout.token_indices_of_images(images)
    residual = residual_fn(x[token_index], subset_layout).to(x.dtype)
    out = x if inplace else x.clone()
    start = 0
    for (batch, tokens), kept in zip(layout.groups, images):
        size = kept.shape[0] * tokens
        rows = slice(start, start + size)
        out.index_add_(0, token_index[rows], residual[rows], alpha=batch / kept.shape[0])
        start += size
    return out
