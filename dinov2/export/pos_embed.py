"""Bicubic position-embedding resampling written as two interpolation matrices, for export.

``torch.nn.functional.interpolate`` with a ``scale_factor`` that depends on the input size is
traced into a constant (the long-standing complaint that an exported DINOv2 only runs at the
size it was exported at). Here the same resampling is computed from ``arange`` over the output
grid, so the output size stays symbolic in ``torch.export`` / ONNX graphs:
``out = A_h @ grid @ A_w^T`` with ``A`` the interpolation weights of PyTorch's own kernels:

- plain bicubic (``align_corners=False``, cubic coefficient -0.75, border indices clamped),
  source position ``scale * (dst + 0.5) - 0.5`` with ``scale = 1 / scale_factor`` when the
  official offset is used (``scale_factor = (out + offset) / M``) and ``M / out`` otherwise;
- antialiased bicubic (PIL's filter, coefficient -0.5, support widened by the scale when
  shrinking, weights normalised per output).

At the training grid the model uses its embeddings unchanged: the scale is then 1, whose
weights are exactly the identity. Pure functions; the reference is ``dinov2.models.pos_embed``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel at distance ``x`` (any sign)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(dst: Tensor, in_size: int, scale: Tensor) -> Tensor:
    """``[out, in]`` weights of PyTorch's bicubic upsampling (``align_corners=False``) for output pixels
    ``dst`` (``arange(out)``, float); ``scale`` is input pixels per output pixel."""
    src = scale * (dst + 0.5) - 0.5
    base = torch.floor(src)
    t = src - base
    columns = torch.arange(in_size, dtype=torch.float32, device=dst.device)[None, :]
    terms = []
    for k, distance in enumerate((t + 1, t, 1 - t, 2 - t)):  # taps at base-1 .. base+2, clamped at the border
        index = torch.clamp(base - 1 + k, 0, in_size - 1)
        terms.append(_cubic(distance, -0.75)[:, None] * (index[:, None] == columns))
    return terms[0] + terms[1] + terms[2] + terms[3]


def antialiased_bicubic_matrix(dst: Tensor, in_size: int, scale: Tensor) -> Tensor:
    """``[out, in]`` weights of PyTorch's antialiased bicubic resampling (PIL's filter)."""
    center = scale * (dst + 0.5)
    widen = torch.clamp(scale, min=1.0)  # the filter stretches only when shrinking
    support = 2.0 * widen
    low = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    high = torch.clamp(torch.trunc(center + support + 0.5), max=float(in_size))
    columns = torch.arange(in_size, dtype=torch.float32, device=dst.device)[None, :]
    weights = _cubic((columns - center[:, None] + 0.5) / widen, -0.5)
    weights = weights * ((columns >= low[:, None]) & (columns < high[:, None]))
    return weights / weights.sum(dim=1, keepdim=True)


def resample_for_export(patch_pos_embed: Tensor, grid_h, grid_w, *, interpolate_offset: float,
                        antialias: bool) -> Tensor:
    """``[1, M*M, D]`` embeddings resampled to ``grid_h x grid_w`` exactly as
    ``DinoVisionTransformer.interpolate_pos_encoding`` does (unchanged at the training grid). The
    grid sizes may be symbolic (``torch.export``): every size-dependent value is computed from
    ``arange`` tensors, never from Python numbers, so nothing is frozen into the graph."""
    if interpolate_offset and antialias:
        raise NotImplementedError("antialiased resampling with an interpolate_offset is not exportable here "
                                  "(no released model uses it); the _reg models use offset 0 with antialiasing")
    num_patches, dim = patch_pos_embed.shape[1], patch_pos_embed.shape[2]
    side = int(round(num_patches ** 0.5))
    device = patch_pos_embed.device
    rows = torch.arange(grid_h, dtype=torch.float32, device=device)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device)
    out_h, out_w = torch.ones_like(rows).sum(), torch.ones_like(cols).sum()  # the sizes, as tensors
    native = (out_h == side) & (out_w == side)

    def scale(out: Tensor) -> Tensor:
        # As PyTorch's kernels: 1 / scale_factor in double, then float; or input / output in float.
        if interpolate_offset:
            resampled = (1.0 / ((out.double() + interpolate_offset) / side)).float()
        else:
            resampled = side / out
        return torch.where(native, torch.ones_like(resampled), resampled)

    build = antialiased_bicubic_matrix if antialias else bicubic_matrix
    grid = patch_pos_embed.float().reshape(side, side, dim)
    out = torch.einsum("hi,ijd,wj->hwd", build(rows, side, scale(out_h)), grid, build(cols, side, scale(out_w)))
    return out.reshape(1, -1, dim)
