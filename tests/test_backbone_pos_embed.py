"""Position-embedding resampling against a numpy bicubic written from the kernel definitions.

Non-antialiased bicubic: Keys' cubic convolution with a = -0.75, source coordinate
(i + 0.5) / scale - 0.5, border samples clamped. Antialiased bicubic (PIL's): a = -0.5, the
kernel support stretched by 1/scale when downsampling, weights renormalised, no clamping.
The released models resample with scale (h + offset) / M, which these references check.
"""

import math

import numpy as np
import pytest
import torch

from dinov2.models.pos_embed import resample_patch_pos_embed


def cubic(x, a):
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def weights_plain(in_size, out_size, scale):
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        t = src - base
        for tap in range(-1, 3):
            matrix[i, min(max(base + tap, 0), in_size - 1)] += cubic(t - tap, -0.75)
    return matrix


def weights_antialias(in_size, out_size, scale):
    support_scale = max(1.0 / scale, 1.0)
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) / scale
        lo = max(int(center - 2 * support_scale + 0.5), 0)
        hi = min(int(center + 2 * support_scale + 0.5), in_size)
        w = np.array([cubic((j - center + 0.5) / support_scale, -0.5) for j in range(lo, hi)])
        matrix[i, lo:hi] = w / w.sum()
    return matrix


def reference(grid, out_hw, scales, antialias):
    make = weights_antialias if antialias else weights_plain
    rows = make(grid.shape[0], out_hw[0], scales[0])
    cols = make(grid.shape[1], out_hw[1], scales[1])
    return np.einsum("ij,jkd,lk->ild", rows, grid, cols)


@pytest.mark.parametrize(
    "out_hw, offset, antialias",
    [((16, 22), 0.1, False), ((7, 7), 0.1, False), ((16, 22), 0.0, True), ((7, 9), 0.0, True), ((4, 4), 0.0, False)],
)
def test_resampling_matches_numpy_bicubic(out_hw, offset, antialias):
    side, dim = 6, 5
    grid = np.random.default_rng(0).normal(size=(side, side, dim))
    got = resample_patch_pos_embed(
        torch.tensor(grid, dtype=torch.float32).reshape(1, side * side, dim), out_hw,
        interpolate_offset=offset, antialias=antialias,
    )
    scales = [(n + offset) / side if offset else n / side for n in out_hw]
    want = reference(grid, out_hw, scales, antialias).reshape(1, -1, dim)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_offset_changes_sampling_positions():
    grid = torch.randn(1, 36, 3)
    with_offset = resample_patch_pos_embed(grid, (16, 16), interpolate_offset=0.1)
    by_size = resample_patch_pos_embed(grid, (16, 16), interpolate_offset=0.0)
    assert with_offset.shape == by_size.shape == (1, 256, 3)
    assert not torch.allclose(with_offset, by_size)


def test_constant_embedding_stays_constant():
    grid = torch.full((1, 25, 4), 0.7)
    for antialias in (False, True):
        out = resample_patch_pos_embed(grid, (3, 11), interpolate_offset=0.0, antialias=antialias)
        torch.testing.assert_close(out, torch.full((1, 33, 4), 0.7))


def test_non_square_grid_is_rejected():
    with pytest.raises(ValueError, match="square"):
        resample_patch_pos_embed(torch.randn(1, 10, 3), (4, 4))
