"""Block-wise iBOT masking: geometry, counts, connectivity, explicit RNG."""

import random

import numpy as np
import pytest
from skimage.measure import label

from dinov2.data import MaskingGenerator


def _bbox(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_single_square_block_when_area_and_aspect_are_fixed():
    # Area fixed at 16 with aspect 1: the first rectangle is a 4x4 square that uses the
    # whole budget, so the mask is exactly one filled 4x4 block.
    gen = MaskingGenerator(8, min_num_patches=16, max_num_patches=16, min_aspect=1.0, max_aspect=1.0)
    tops, lefts = set(), set()
    for seed in range(200):
        mask = gen(16, rng=np.random.default_rng(seed))
        top, left, h, w = _bbox(mask)
        assert (h, w) == (4, 4) and mask.sum() == 16
        assert mask[top : top + 4, left : left + 4].all()
        tops.add(top)
        lefts.add(left)
    # Placement is uniform over every valid corner (0..8-4).
    assert tops == set(range(5)) and lefts == set(range(5))


def test_aspect_ratio_is_height_over_width():
    # aspect 4, area 16 -> h = round(sqrt(64)) = 8, w = round(sqrt(4)) = 2.
    gen = MaskingGenerator((10, 10), min_num_patches=16, max_num_patches=16, min_aspect=4.0, max_aspect=4.0)
    mask = gen(16, rng=random.Random(0))
    top, left, h, w = _bbox(mask)
    assert (h, w) == (8, 2) and mask.sum() == 16


def test_counts_never_exceed_target_and_get_close():
    # The trainer's setting for 224 px / patch 14: 16x16 grid, blocks up to half of it.
    gen = MaskingGenerator((16, 16), max_num_patches=0.5 * 256)
    rng = np.random.default_rng(0)
    for target in (10, 51, 77, 128):
        counts = np.array([gen(target, rng=rng).sum() for _ in range(60)])
        assert counts.max() <= target
        assert counts.mean() >= 0.97 * target


def test_masks_are_blockwise_not_scattered():
    gen = MaskingGenerator((16, 16), max_num_patches=128)
    rng = np.random.default_rng(1)
    n_components = [label(gen(60, rng=rng), connectivity=1).max() for _ in range(100)]
    # A few rectangles (often overlapping) per mask; 60 scattered patches would give ~40.
    assert np.mean(n_components) < 4
    scattered = np.zeros(256, bool)
    scattered[rng.choice(256, 60, replace=False)] = True
    assert label(scattered.reshape(16, 16), connectivity=1).max() > 20  # the metric can tell


def test_rectangular_grid_shape_and_dtype():
    gen = MaskingGenerator((6, 11), max_num_patches=30)
    mask = gen(20, rng=np.random.default_rng(0))
    assert mask.shape == (6, 11) and mask.dtype == bool and 0 < mask.sum() <= 20
    assert gen.num_patches == 66


def test_zero_target_is_empty_and_needs_no_rng():
    gen = MaskingGenerator(14, max_num_patches=98)
    assert not gen(0).any()
    with pytest.raises(ValueError, match="rng"):
        gen(10)


def test_deterministic_under_seed_for_both_rng_kinds_and_global_state_untouched():
    gen = MaskingGenerator(14, max_num_patches=98)
    py_state, np_state = random.getstate(), np.random.get_state()
    a = gen(50, rng=np.random.default_rng(7))
    b = gen(50, rng=np.random.default_rng(7))
    c = gen(50, rng=random.Random(7))
    d = gen(50, rng=random.Random(7))
    assert np.array_equal(a, b) and np.array_equal(c, d)
    assert not np.array_equal(a, gen(50, rng=np.random.default_rng(8)))
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
