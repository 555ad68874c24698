"""make_ssl_data_loader: exact resume (bitwise), sharding, skipped-file accounting."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from dinov2.data import DataAugmentationDINO, MaskingGenerator, NumpyArrayDataset, RankLayout, SSLBatch, make_ssl_data_loader

BATCH = 4
GLOBAL, LOCAL, PATCH = 16, 8, 4
N_TOKENS = (GLOBAL // PATCH) ** 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def array_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("arrays") / "images.npy"
    rs = np.random.RandomState(0)
    np.save(path, rs.randint(0, 256, (10, 3, 20, 20)).astype(np.uint8))  # 10 images: epochs wrap mid-run
    return str(path)


def _loader(array_path, *, start=0, num_workers=0, rank=0, world_size=1, dataset=None):
    return make_ssl_data_loader(
        dataset if dataset is not None else NumpyArrayDataset(array_path),
        DataAugmentationDINO(local_crops_number=2, global_crops_size=GLOBAL, local_crops_size=LOCAL),
        batch_size_per_rank=BATCH, num_workers=num_workers, seed=123, rank=rank, world_size=world_size,
        start=start, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, n_tokens=N_TOKENS,
        mask_generator=MaskingGenerator(GLOBAL // PATCH, max_num_patches=0.5 * N_TOKENS),
    )


def _batches(loader, n):
    return list(itertools.islice(iter(loader), n))


def _assert_same_batch(a, b):
    assert isinstance(a, SSLBatch) and isinstance(b, SSLBatch)
    for field in dataclasses.fields(SSLBatch):
        x, y = getattr(a, field.name), getattr(b, field.name)
        assert x.dtype == y.dtype and torch.equal(x, y), field.name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_loader_yields_the_uninterrupted_batches_bitwise(array_path, num_workers):
    k, m = 3, 3
    uninterrupted = _batches(_loader(array_path, num_workers=num_workers), k + m)
    first = _loader(array_path, num_workers=num_workers)
    _batches(first, k)
    assert first.position == k * BATCH  # consumed batches only, not what workers prefetched
    resumed = _batches(_loader(array_path, start=first.position, num_workers=num_workers), m)
    for a, b in zip(uninterrupted[k:], resumed):
        _assert_same_batch(a, b)
    # Consecutive batches differ, so the equality above is not vacuous.
    assert not torch.equal(uninterrupted[0].global_crops, uninterrupted[1].global_crops)
    assert not torch.equal(uninterrupted[0].masks, uninterrupted[1].masks)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_new_iterator_continues_where_the_consumer_stopped(array_path, num_workers):
    loader = _loader(array_path, num_workers=num_workers)
    first = _batches(loader, 2)  # workers have prefetched beyond these
    second = _batches(loader, 2)
    assert loader.position == 4 * BATCH
    for a, b in zip(first + second, _batches(_loader(array_path), 4)):
        _assert_same_batch(a, b)


def test_workers_do_not_change_the_batches(array_path):
    for a, b in zip(_batches(_loader(array_path), 2), _batches(_loader(array_path, num_workers=2), 2)):
        _assert_same_batch(a, b)


def test_batch_contents(array_path):
    loader = _loader(array_path)
    assert not loader.pin_memory or torch.cuda.is_available()
    batch = next(iter(loader))
    assert batch.global_crops.shape == (2 * BATCH, 3, GLOBAL, GLOBAL)
    assert batch.local_crops.shape == (2 * BATCH, 3, LOCAL, LOCAL)
    assert batch.masks.shape == (2 * BATCH, N_TOKENS)
    assert int((batch.masks.sum(1) > 0).sum()) == BATCH  # half of the global crops
    assert loader.position == BATCH and not loader.skipped_files
    assert _loader(array_path, num_workers=2).persistent_workers


def test_ranks_split_each_global_batch_and_resume_on_another_world_size(array_path):
    per_rank = [_batches(_loader(array_path, rank=r, world_size=2), 3) for r in range(2)]
    # Crops depend on the position only: each rank's samples reappear on a single-rank run, at the
    # positions RankLayout gives the rank (single-rank batch s holds positions s*B .. s*B + B - 1).
    single = _batches(_loader(array_path), 6)
    crops_by_position = {s * BATCH + j: batch.local_crops[j] for s, batch in enumerate(single) for j in range(BATCH)}
    for rank in range(2):
        for step in range(3):
            positions = RankLayout(BATCH, rank, 2).positions(step * 2 * BATCH)
            for j, p in enumerate(positions):
                assert torch.equal(per_rank[rank][step].local_crops[j], crops_by_position[p])
    loader = _loader(array_path, rank=1, world_size=2)
    _batches(loader, 1)
    assert loader.position == 2 * BATCH  # one GLOBAL batch consumed


def test_unreadable_samples_are_skipped_and_counted(array_path):
    class Flaky(NumpyArrayDataset):
        def __getitem__(self, index):
            if index == 4:
                raise OSError("simulated corrupt file")
            return super().__getitem__(index)

    loader = _loader(array_path, dataset=Flaky(array_path))
    batches = _batches(loader, 5)  # 20 samples = 2 epochs: item 4 is hit twice, but is one file
    assert len(batches) == 5 and loader.skipped_files == {4}


def test_creating_and_iterating_does_not_consume_the_global_rng(array_path):
    state = torch.get_rng_state()
    _batches(_loader(array_path), 2)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.timeout(120)
def test_workers_do_not_hang_after_the_parent_used_opencv_threads(array_path):
    # Reproduces a deadlock: workers forked from a process whose OpenCV thread pool had run froze in
    # cv2.setNumThreads (as in the full test suite, where earlier tests use OpenCV).
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        image = np.random.RandomState(0).randint(0, 255, (512, 512, 3)).astype(np.uint8)
        for _ in range(3):
            cv2.GaussianBlur(image, (31, 31), 5)  # the pool's threads now exist in this process
        batches = _batches(_loader(array_path, num_workers=2), 2)
    finally:
        cv2.setNumThreads(threads)
    _assert_same_batch(batches[1], _batches(_loader(array_path, num_workers=0), 2)[1])
