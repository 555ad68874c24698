"""collate_data_and_cast: crop-major stacking and the official masking rule."""

import random

import numpy as np
import pytest
import torch

from dinov2.data import MaskingGenerator, collate_data_and_cast

GRID = 14
N_TOKENS = GRID * GRID  # 196: 224 px at patch 16


def _samples(batch=4, n_global=2, n_local=3):
    # Every crop is constant and encodes (sample, crop) so the ordering is readable.
    out = []
    for s in range(batch):
        crops = {
            "global_crops": [torch.full((3, 8, 8), 100.0 * s + c) for c in range(n_global)],
            "local_crops": [torch.full((3, 4, 4), 100.0 * s + 10 + c) for c in range(n_local)],
        }
        out.append((crops, -1))
    return out


def _collate(rng, batch=4, mask_probability=0.5, ratio=(0.1, 0.5), dtype=torch.float32):
    gen = MaskingGenerator(GRID, max_num_patches=0.5 * N_TOKENS)
    return collate_data_and_cast(_samples(batch), ratio, mask_probability, dtype, N_TOKENS, gen, rng)


def test_crops_are_stacked_crop_major_and_cast():
    out = _collate(np.random.default_rng(0), dtype=torch.float16)  # exact for these integers
    g, l = out["collated_global_crops"], out["collated_local_crops"]
    assert g.shape == (8, 3, 8, 8) and l.shape == (12, 3, 4, 4)
    assert g.dtype == torch.float16 and l.dtype == torch.float16
    # All first global crops (samples 0..3), then all second ones.
    assert g[:, 0, 0, 0].float().tolist() == [0, 100, 200, 300, 1, 101, 201, 301]
    assert l[:, 0, 0, 0].float().tolist() == [10, 110, 210, 310, 11, 111, 211, 311, 12, 112, 212, 312]


def test_half_of_the_global_crops_get_stratified_masks():
    for seed in range(10):
        out = _collate(np.random.default_rng(seed))
        masks = out["collated_masks"]
        assert masks.shape == (8, N_TOKENS) and masks.dtype == torch.bool
        counts = masks.sum(1)
        # int(8 * 0.5) = 4 masked crops, the rest empty.
        assert (counts > 0).sum() == 4
        # Ratio bins [0.1,0.2], [0.2,0.3], [0.3,0.4], [0.4,0.5] of 196 tokens:
        # upperbound = int(196*.2) + int(196*.3) + int(196*.4) + int(196*.5) = 39+58+78+98.
        assert out["upperbound"] == 273
        # The k-th smallest count lies in (about) the k-th bin: never above its top,
        # and block masking gets within 10% of the drawn target.
        for k, c in enumerate(sorted(counts[counts > 0].tolist())):
            lo, hi = 0.1 + 0.1 * k, 0.2 + 0.1 * k
            assert 0.9 * int(N_TOKENS * lo) <= c <= int(N_TOKENS * hi)


def test_indices_weights_and_counts_are_consistent():
    out = _collate(np.random.default_rng(3))
    masks = out["collated_masks"]
    flat = masks.flatten()
    assert torch.equal(out["mask_indices_list"], torch.from_numpy(np.flatnonzero(flat.numpy())))
    assert out["n_masked_patches"].dtype == torch.long and out["n_masked_patches"].tolist() == [int(flat.sum())]
    # One weight per masked patch, row-major: 1 / (masked count of its row).
    expected = [1.0 / int(masks[r].sum()) for r in range(len(masks)) for _ in range(int(masks[r].sum()))]
    assert torch.allclose(out["masks_weight"], torch.tensor(expected))
    # Each masked image contributes total weight 1.
    assert out["masks_weight"].sum().item() == pytest.approx(4.0)


def test_which_crops_are_masked_is_shuffled():
    masked_rows = torch.zeros(8)
    for seed in range(40):
        masked_rows += (_collate(np.random.default_rng(seed))["collated_masks"].sum(1) > 0).float()
    assert (masked_rows > 0).all() and (masked_rows < 40).all()


def test_deterministic_under_rng_and_global_rng_untouched():
    state = random.getstate()
    torch_state = torch.get_rng_state()
    a, b = _collate(np.random.default_rng(5)), _collate(np.random.default_rng(5))
    c, d = _collate(random.Random(5)), _collate(random.Random(5))
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    assert torch.equal(c["collated_masks"], d["collated_masks"])
    assert not torch.equal(a["collated_masks"], _collate(np.random.default_rng(6))["collated_masks"])
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)


def test_no_masking():
    out = _collate(np.random.default_rng(0), mask_probability=0.0)
    assert not out["collated_masks"].any()
    assert out["upperbound"] == 0 and out["n_masked_patches"].item() == 0
    assert out["masks_weight"].numel() == 0 and out["mask_indices_list"].numel() == 0


def test_grid_mismatch_is_an_error():
    gen = MaskingGenerator(10)
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast(_samples(), (0.1, 0.5), 0.5, torch.float32, N_TOKENS, gen, np.random.default_rng(0))
