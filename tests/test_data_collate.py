"""SSLCollate / SSLBatch: crop-major stacking, slots of a global batch, and the official masking rule."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from dinov2.data import MaskingGenerator, RankLayout, Sample, SampleKey, SSLBatch, SSLCollate

GRID = 14
N_TOKENS = GRID * GRID  # 196: 224 px at patch 16


def _samples(positions=range(4), batch_start=0, n_global=2, n_local=3, dtype=torch.float32):
    # Every crop is constant and encodes (offset in the global batch, crop) so the ordering is readable.
    out = []
    for p in positions:
        crops = {
            "global_crops": [torch.full((3, 8, 8), 30 * (p - batch_start) + c, dtype=dtype) for c in range(n_global)],
            "local_crops": [torch.full((3, 4, 4), 30 * (p - batch_start) + 10 + c, dtype=dtype) for c in range(n_local)],
        }
        out.append(Sample(crops, SampleKey(p % 7, p, batch_start), skipped=(100 + p,) if p % 2 else ()))
    return out


def _collate(batch_start=0, batch=4, mask_probability=0.5, ratio=(0.1, 0.5), seed=0, **kw):
    collate = SSLCollate(seed, batch, ratio, mask_probability, MaskingGenerator(GRID, max_num_patches=0.5 * N_TOKENS),
                         N_TOKENS)
    return collate(_samples(range(batch_start, batch_start + batch), batch_start, **kw))


def test_crops_are_stacked_crop_major_and_keep_their_dtype():
    out, skipped = _collate(dtype=torch.uint8)
    g, l = out.global_crops, out.local_crops
    assert g.shape == (8, 3, 8, 8) and l.shape == (12, 3, 4, 4)
    assert g.dtype == torch.uint8 and l.dtype == torch.uint8
    # All first global crops (samples 0..3), then all second ones.
    assert g[:, 0, 0, 0].tolist() == [0, 30, 60, 90, 1, 31, 61, 91]
    assert l[:, 0, 0, 0].tolist() == [10, 40, 70, 100, 11, 41, 71, 101, 12, 42, 72, 102]
    assert skipped == (101, 103)  # positions 1 and 3 each passed over one unreadable file


def test_without_local_crops_the_local_batch_is_empty():
    out, _ = _collate(n_local=0)
    assert out.local_crops.shape[0] == 0 and out.global_crops.shape == (8, 3, 8, 8)


def test_half_of_the_global_crops_get_stratified_masks():
    for batch_start in range(0, 40, 4):
        masks = _collate(batch_start)[0].masks
        assert masks.shape == (8, N_TOKENS) and masks.dtype == torch.bool
        counts = masks.sum(1)
        # int(8 * 0.5) = 4 masked crops, the rest empty.
        assert (counts > 0).sum() == 4
        # Ratio bins [0.1,0.2], [0.2,0.3], [0.3,0.4], [0.4,0.5] of 196 tokens: the k-th smallest count is
        # never above int(196 * top of bin k), and block masking gets within 10% of the drawn target.
        for k, c in enumerate(sorted(counts[counts > 0].tolist())):
            lo, hi = 0.1 + 0.1 * k, 0.2 + 0.1 * k
            assert 0.9 * int(N_TOKENS * lo) <= c <= int(N_TOKENS * hi)


def test_indices_weights_and_counts_are_consistent():
    out = _collate(12)[0]
    flat = out.masks.flatten()
    assert torch.equal(out.mask_indices, torch.from_numpy(np.flatnonzero(flat.numpy())))
    assert out.n_masked_patches.dtype == torch.long and out.n_masked_patches.tolist() == [int(flat.sum())]
    # One weight per masked patch, row-major: 1 / (masked count of its row).
    expected = [1.0 / int(m.sum()) for m in out.masks for _ in range(int(m.sum()))]
    assert torch.allclose(out.masks_weight, torch.tensor(expected))
    # Each masked image contributes total weight 1.
    assert out.masks_weight.sum().item() == pytest.approx(4.0)


def test_which_crops_are_masked_is_shuffled():
    masked_rows = torch.zeros(8)
    for batch_start in range(0, 160, 4):
        masked_rows += (_collate(batch_start)[0].masks.sum(1) > 0).float()
    assert (masked_rows > 0).all() and (masked_rows < 40).all()


def test_masks_are_a_function_of_seed_and_batch_start_and_global_rng_is_untouched():
    state, torch_state, np_state = random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy()
    a = _collate(8)[0].masks
    assert torch.equal(a, _collate(8)[0].masks)
    assert not torch.equal(a, _collate(12)[0].masks)
    assert not torch.equal(a, _collate(8, seed=1)[0].masks)
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_gets_the_rows_of_its_slots_in_the_single_rank_batch(world_size):
    """The slot rule: rank r's batch is exactly the rows of the single-rank batch at its positions."""
    batch_start, per_rank = 16, 8 // world_size
    single = _collate(batch_start, batch=8)[0]
    collate = SSLCollate(0, 8, (0.1, 0.5), 0.5, MaskingGenerator(GRID, max_num_patches=0.5 * N_TOKENS), N_TOKENS)
    for rank in range(world_size):
        positions = RankLayout(per_rank, rank, world_size).positions(batch_start)
        part = collate(_samples(positions, batch_start))[0]
        rows = [c * 8 + p - batch_start for c in range(2) for p in positions]
        assert torch.equal(part.global_crops, single.global_crops[rows])
        assert torch.equal(part.masks, single.masks[rows])


def test_no_masking():
    out = _collate(mask_probability=0.0)[0]
    assert not out.masks.any() and out.n_masked_patches.item() == 0
    assert out.masks_weight.numel() == 0 and out.mask_indices.numel() == 0


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="n_tokens"):
        SSLCollate(0, 4, (0.1, 0.5), 0.5, MaskingGenerator(10), N_TOKENS)
    with pytest.raises(ValueError, match="mask_probability"):
        SSLCollate(0, 4, (0.1, 0.5), 1.5, MaskingGenerator(GRID), N_TOKENS)
    collate = SSLCollate(0, 4, (0.1, 0.5), 0.5, MaskingGenerator(GRID), N_TOKENS)
    with pytest.raises(ValueError, match=r"not all in the global batch \[0, 4\)"):
        collate(_samples(range(2, 6), batch_start=0))


def test_batch_moves_and_pins_every_field():
    batch = _collate(dtype=torch.uint8)[0]
    moved = batch.to("meta")
    assert isinstance(moved, SSLBatch)
    for field in dataclasses.fields(SSLBatch):
        before, after = getattr(batch, field.name), getattr(moved, field.name)
        assert after.is_meta and after.shape == before.shape and after.dtype == before.dtype, field.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_dataloader_pin_memory_pins_the_batch():
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned, skipped = pin_memory(_collate(dtype=torch.uint8))
    assert isinstance(pinned, SSLBatch) and skipped == (101, 103)
    assert all(getattr(pinned, f.name).is_pinned() for f in dataclasses.fields(SSLBatch))
    on_device = pinned.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_device.global_crops.cpu(), pinned.global_crops)
