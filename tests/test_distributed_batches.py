"""The global batch does not depend on how many ranks share it: W ranks with B samples each get
the crops AND iBOT masks a single rank with W*B samples gets for the same positions."""

import itertools

import numpy as np
import pytest
import torch

from dinov2.data import DataAugmentationDINO, MaskingGenerator, NumpyArrayDataset, RankLayout, make_ssl_data_loader

GLOBAL, LOCAL, PATCH = 16, 8, 4
N_TOKENS = (GLOBAL // PATCH) ** 2


@pytest.fixture(scope="module")
def array_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("arrays") / "images.npy"
    np.save(path, np.random.RandomState(0).randint(0, 256, (24, 3, 20, 20)).astype(np.uint8))
    return str(path)


def _batches(array_path, batch, rank, world_size, n, start=0):
    loader = make_ssl_data_loader(
        NumpyArrayDataset(array_path), DataAugmentationDINO(local_crops_number=2, global_crops_size=GLOBAL,
                                                            local_crops_size=LOCAL),
        batch_size_per_rank=batch, num_workers=0, seed=7, rank=rank, world_size=world_size, start=start,
        mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, n_tokens=N_TOKENS,
        mask_generator=MaskingGenerator(GLOBAL // PATCH, max_num_patches=0.5 * N_TOKENS),
    )
    layout = RankLayout(batch, rank, world_size)
    batches = list(itertools.islice(iter(loader), n))
    return [_by_position(b, layout.positions(start + step * layout.global_batch_size)) for step, b in enumerate(batches)]


def _by_position(batch, positions):
    """{(crop, position): (global crop, mask)} for every global crop of a batch."""
    out = {}
    for index in range(len(batch.global_crops)):
        crop, j = divmod(index, len(positions))
        out[(crop, positions[j])] = (batch.global_crops[index], batch.masks[index])
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_get_the_single_rank_crops_and_masks_of_their_positions(array_path, world_size):
    per_rank, steps = 8 // world_size, 2
    single = _batches(array_path, 8, 0, 1, steps, start=8)
    ranks = [_batches(array_path, per_rank, r, world_size, steps, start=8) for r in range(world_size)]
    for step in range(steps):
        merged = {k: v for r in range(world_size) for k, v in ranks[r][step].items()}
        assert merged.keys() == single[step].keys()
        for key, (crop, mask) in single[step].items():
            assert torch.equal(merged[key][0], crop) and torch.equal(merged[key][1], mask), key
        # The official rule holds for the global batch: half of its 16 global crops are masked,
        # with stratified ratios, wherever they landed.
        counts = sorted(int(m.sum()) for _, m in single[step].values())
        assert sum(c > 0 for c in counts) == 8
        assert counts[-1] <= int(N_TOKENS * 0.5) and counts[-8] >= 1
    # Masks change from one global batch to the next, so the equality above is not vacuous.
    first, second = (torch.stack([m for _, m in batch.values()]) for batch in single[:2])
    assert not torch.equal(first, second)
