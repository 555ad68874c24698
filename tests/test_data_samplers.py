"""InfiniteSampler / RankLayout (global positions, sharding, resume) and SSLDataset (crops = f(seed, position))."""

import itertools
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from dinov2.data import DataAugmentationDINO, InfiniteSampler, RankLayout, SampleKey, SSLDataset


def _take(sampler, n_batches):
    """The sampler's first ``n_batches`` batches, flattened to (index, position) pairs."""
    batches = list(itertools.islice(iter(sampler), n_batches))
    return [(k.index, k.position) for batch in batches for k in batch]


def _sampler(n, batch=1, rank=0, world_size=1, **kw):
    return InfiniteSampler(n, RankLayout(batch, rank, world_size), **kw)


def _global_stream(n, world_size, length, start=0, batch=1, **kw):
    """Merge every rank's (index, position) pairs back into one position-ordered stream."""
    steps = length // (world_size * batch)
    pairs = [p for r in range(world_size) for p in _take(_sampler(n, batch, r, world_size, start=start, **kw), steps)]
    pairs.sort(key=lambda p: p[1])
    positions = [p[1] for p in pairs]
    assert positions == list(range(start, start + steps * batch * world_size))  # no gap, no duplicate
    return [p[0] for p in pairs]


def test_every_index_exactly_once_per_epoch_across_ranks():
    n = 10
    stream = _global_stream(n, world_size=3, length=3 * 10 * 3, seed=5)  # 9 epochs' worth
    epochs = [stream[e * n : (e + 1) * n] for e in range(len(stream) // n)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
    assert epochs[0] != list(range(n))


def test_ranks_take_interleaved_global_positions():
    pairs = _take(_sampler(7, batch=1, rank=1, world_size=4, start=9), 5)
    assert [p for _, p in pairs] == [10, 14, 18, 22, 26]
    assert list(RankLayout(3, 1, 4).positions(24)) == [25, 29, 33]
    # Every key names the global batch it belongs to; the ranks together cover each global batch once.
    batches = [next(iter(_sampler(7, batch=3, rank=r, world_size=4, start=24))) for r in range(4)]
    assert {k.batch_start for b in batches for k in b} == {24}
    assert sorted(k.position for b in batches for k in b) == list(range(24, 36))


def test_stream_is_seeded_and_independent_of_world_size():
    one = _global_stream(10, 1, 60, seed=3)
    assert one == _global_stream(10, 2, 60, seed=3) == _global_stream(10, 3, 60, seed=3)
    assert one == _global_stream(10, 3, 60, batch=4, seed=3) == _global_stream(10, 2, 60, batch=5, seed=3)
    assert one == _global_stream(10, 1, 60, seed=3)
    assert one != _global_stream(10, 1, 60, seed=4)


def test_resume_at_any_position_continues_the_same_stream():
    full = _global_stream(10, 1, 80, seed=1)
    for start in (0, 7, 10, 24):
        # Resumed on a different world size (2 ranks) than the original run (1 rank).
        assert _global_stream(10, 2, 40, start=start, seed=1) == full[start : start + 40]
        assert [i for i, _ in _take(_sampler(10, seed=1, start=start), 25)] == full[start : start + 25]


def test_no_shuffle_is_sequential():
    assert [i for i, _ in _take(_sampler(4, shuffle=False, rank=1, world_size=2), 4)] == [1, 3, 1, 3]
    assert InfiniteSampler(4, shuffle=False).index_at(6) == 2


def test_invalid_arguments():
    with pytest.raises(ValueError):
        InfiniteSampler(0)
    with pytest.raises(ValueError, match="rank"):
        RankLayout(1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size_per_rank"):
        RankLayout(0)
    with pytest.raises(ValueError, match="start"):
        InfiniteSampler(5, start=-1)


class _Images(Dataset):
    def __init__(self, n=6, bad=()):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=g)
        self.bad = set(bad)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError(f"cannot decode item {i}")
        return self.x[i], i


@pytest.fixture(scope="module")
def aug():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield DataAugmentationDINO(local_crops_number=2, global_crops_size=16, local_crops_size=8)
    torch.set_num_threads(n)


def _same(a, b):
    return all(torch.equal(x, y) for k in ("global_crops", "local_crops") for x, y in zip(a[k], b[k]))


def test_ssl_dataset_crops_are_a_function_of_seed_and_position(aug):
    ds = SSLDataset(_Images(), aug, seed=0)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    sample = ds[SampleKey(2, 17, 16)]
    a = sample.crops
    assert sample.key == (2, 17, 16) and sample.skipped == ()
    assert _same(a, ds[(2, 17, 16)].crops)
    assert _same(a, ds[(2, 17, 0)].crops)  # crops depend on the position, not on the batch
    assert _same(a, SSLDataset(_Images(), aug, seed=0)[(2, 17, 16)].crops)  # a fresh process would agree
    assert not _same(a, ds[(2, 18, 16)].crops)  # same image, next position: new crops
    assert not _same(a, SSLDataset(_Images(), aug, seed=1)[(2, 17, 16)].crops)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_ssl_dataset_with_a_global_rng_transform_is_still_reproducible():
    def transform(image):  # a plain transform drawing from the global torch RNG
        return {"global_crops": [image.float() + torch.rand(())], "local_crops": []}

    ds = SSLDataset(_Images(), transform, seed=0)
    state = torch.get_rng_state()
    a, b = ds[(1, 5, 0)].crops, ds[(1, 5, 0)].crops
    assert torch.equal(a["global_crops"][0], b["global_crops"][0])
    assert not torch.equal(a["global_crops"][0], ds[(1, 6, 0)].crops["global_crops"][0])
    assert torch.equal(torch.get_rng_state(), state)


def test_ssl_dataset_skips_unreadable_and_reports_it(aug):
    ds = SSLDataset(_Images(bad={3, 4}), aug, seed=0)
    sample = ds[(3, 100, 96)]
    assert sample.skipped == (3, 4)
    assert _same(sample.crops, SSLDataset(_Images(), aug, seed=0)[(5, 100, 96)].crops)  # image 5 read instead
    assert ds.dataset.num_skipped == 2
