"""Stochastic depth (Huang et al. 2016) over packed token tensors.

For high drop rates DINOv2 does not multiply a residual branch by zero: it runs the branch only
on the kept images and adds the result back scaled by ``batch / kept`` (so the expectation of
the update is unchanged), which saves the dropped images' compute.
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
    images = len(layout.sequence_lengths)
    keep_mask = residual.new_empty(images).bernoulli_(keep).div_(keep)
    per_token = torch.repeat_interleave(
        keep_mask, torch.tensor(layout.sequence_lengths, device=residual.device), output_size=residual.shape[0]
    )
    return residual * per_token[:, None]


def add_residual_on_kept_subset(
    x: Tensor,
    layout: PackLayout,
    residual_fn: Callable[[Tensor, PackLayout], Tensor],
    drop_prob: float,
) -> Tensor:
    """``x + residual_fn(x)`` where, in each crop group, only a random subset of images runs.

    Of each group's ``b`` images ``max(int(b * (1 - drop_prob)), 1)`` are kept; their residual
    is scaled by ``b / kept``; the other images pass through untouched.
    """
    kept_images, scales = [], []
    for batch, tokens in layout.groups:
        kept = max(int(batch * (1.0 - drop_prob)), 1)
        kept_images.append(torch.randperm(batch, device=x.device)[:kept])
        scales.append(torch.full((kept * tokens,), batch / kept, device=x.device, dtype=x.dtype))
    token_index, subset_layout = layout.token_indices_of_images(kept_images)
    residual = residual_fn(x[token_index], subset_layout)
    scale = scales[0] if len(scales) == 1 else torch.cat(scales)
    return torch.index_add(x, 0, token_index, residual.to(x.dtype) * scale[:, None])
