"""A real 2-process gloo group: a batch split over processes gives the single-process result.

The workers compute on their shard and save what they got; the test process (no process
group) computes on the whole batch and compares.
"""

import os
from datetime import timedelta
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2.loss import DINOLoss, iBOTPatchLoss

K = 7
TEMP = 0.05
# Unequal shards on purpose where the semantics allow it (rank 0 / rank 1).
DINO_ROWS = (4, 4)  # the class-token Sinkhorn assumes equal shards (B = B_local * world)
IBOT_ROWS = (5, 8)  # masked patches differ between processes
CENTER_ROWS = (3, 6)
IBOT_IMAGES = (2, 3)

# fork reuses the already imported torch (spawn re-imports it: ~10 s per process on a
# loaded 2-core machine); the workers run single-threaded, which keeps fork safe on Linux.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def make_data():
    g = torch.Generator().manual_seed(0)
    return {
        "dino_logits": torch.randn(sum(DINO_ROWS), K, generator=g),
        "ibot_logits": torch.randn(sum(IBOT_ROWS), K, generator=g),
        "center_steps": [torch.randn(sum(CENTER_ROWS), K, generator=g) for _ in range(2)],
        "patch_tokens": torch.randn(sum(IBOT_IMAGES), 4, K, generator=g),
    }


def shard(x, sizes, rank):
    return x.split(list(sizes))[rank]


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        data, res, group = make_data(), {}, dist.group.WORLD  # the group is handed to each loss explicitly
        res["dino_sk"] = DINOLoss(K, process_group=group).sinkhorn_knopp_teacher(
            shard(data["dino_logits"], DINO_ROWS, rank), TEMP)
        n_local = torch.tensor([IBOT_ROWS[rank]])
        res["ibot_sk"] = iBOTPatchLoss(K, process_group=group).sinkhorn_knopp_teacher(
            shard(data["ibot_logits"], IBOT_ROWS, rank), TEMP, n_masked_patches_tensor=n_local
        )
        res["ibot_n_after"] = n_local.clone()

        eager, split = DINOLoss(K, process_group=group), DINOLoss(K, process_group=group)
        for x in data["center_steps"]:
            local = shard(x, CENTER_ROWS, rank)
            eager.update_center(local)
            split.softmax_center_teacher(local, TEMP)  # applies the pending update
            split.reduce_center_update(local)  # async all-reduce in flight
        split.apply_center_update()
        res["dino_center"], res["dino_center_split"] = eager.center.clone(), split.center.clone()

        patch = iBOTPatchLoss(K, process_group=group)
        patch.update_center(shard(data["patch_tokens"], IBOT_IMAGES, rank))
        res["ibot_center"] = patch.center.clone()

        # No group given: this process's shard alone, although a default process group exists.
        alone = DINOLoss(K)
        alone.update_center(shard(data["center_steps"][0], CENTER_ROWS, rank))
        res["alone_center"] = alone.center.clone()
        res["alone_sk"] = iBOTPatchLoss(K).sinkhorn_knopp_teacher(shard(data["ibot_logits"], IBOT_ROWS, rank), TEMP, 0)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    mp.start_processes(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True, start_method=START_METHOD)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def test_dino_sinkhorn_split_equals_whole_batch(results):
    whole = DINOLoss(K).sinkhorn_knopp_teacher(make_data()["dino_logits"], TEMP)
    split = torch.cat([r["dino_sk"] for r in results])
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)


def test_ibot_sinkhorn_split_equals_whole_batch(results):
    logits = make_data()["ibot_logits"]
    whole = iBOTPatchLoss(K).sinkhorn_knopp_teacher(logits, TEMP, n_masked_patches_tensor=torch.tensor([len(logits)]))
    split = torch.cat([r["ibot_sk"] for r in results])
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    # the caller's per-process count is not overwritten by the all-reduce
    assert [r["ibot_n_after"].item() for r in results] == list(IBOT_ROWS)


def test_sinkhorn_split_differs_from_per_process_sinkhorn(results):
    # Guard: without the all-reduces each shard would be normalised on its own.
    logits = make_data()["ibot_logits"]
    local = iBOTPatchLoss(K).sinkhorn_knopp_teacher(logits[: IBOT_ROWS[0]], TEMP, IBOT_ROWS[0])
    assert not torch.allclose(local, results[0]["ibot_sk"], atol=1e-4)


def test_dino_update_center_equals_single_process(results):
    ref = DINOLoss(K)
    for x in make_data()["center_steps"]:
        ref.update_center(x)
    for r in results:
        torch.testing.assert_close(r["dino_center"], ref.center, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["dino_center_split"], ref.center, rtol=1e-5, atol=1e-7)


def test_ibot_update_center_equals_single_process(results):
    ref = iBOTPatchLoss(K)
    ref.update_center(make_data()["patch_tokens"])
    for r in results:
        torch.testing.assert_close(r["ibot_center"], ref.center, rtol=1e-5, atol=1e-7)


def test_no_process_group_means_this_process_alone(results):
    """``process_group=None`` is "not distributed" even inside an initialised default group: the losses do
    not look the default group up (they used to all-reduce over it)."""
    data = make_data()
    for rank, r in enumerate(results):
        ref = DINOLoss(K)
        ref.update_center(shard(data["center_steps"][0], CENTER_ROWS, rank))
        torch.testing.assert_close(r["alone_center"], ref.center, rtol=0, atol=0)
        local = iBOTPatchLoss(K).sinkhorn_knopp_teacher(shard(data["ibot_logits"], IBOT_ROWS, rank), TEMP, 0)
        torch.testing.assert_close(r["alone_sk"], local, rtol=0, atol=0)
