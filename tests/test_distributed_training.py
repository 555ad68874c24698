"""FSDP2 over 2 real gloo processes equals one process on the same global batch.

One process with batch 2B and two ranks with B each see the same global batch (the sampler
splits positions, crops and masks are functions of the position), so losses and updated
parameters must agree to float tolerance, with softmax centering (FSDP) and with
Sinkhorn-Knopp (HSDP mesh).
The 2-rank run also writes sharded DCP checkpoints, read back here in a plain process.
"""

import pytest
import torch

from dinov2.checkpoint.export import read_tensors, resolve_checkpoint
from dinov2.configs import load_config
from dinov2.logging import read_metrics
from dinov2.train.train import Trainer, run
from gloo_ranks import DIST_TINY, run_ranks, write_dataset

STEPS = 3


def _train(overrides, out_dir):
    result, env = run(load_config(None, overrides), out_dir)
    return {"rank": env.rank, "world_size": env.world_size, "mesh": tuple(env.mesh.shape), "result": result}


def _losses(run_dir):
    return [(m["step"], m["total_loss"], m["dino_global_crops_loss"], m["ibot_loss"]) for m in read_metrics(run_dir)]


# FSDP over both ranks with centering; HSDP (replicate over 2 groups of 1) with Sinkhorn-Knopp.
@pytest.mark.parametrize("centering,replicate,mesh", [("centering", 1, (2,)), ("sinkhorn_knopp", 2, (2, 1))])
def test_two_gloo_ranks_equal_one_process_on_the_same_global_batch(tmp_path, centering, replicate, mesh):
    common = DIST_TINY + [write_dataset(tmp_path / "images.npy"), f"train.centering={centering}",
                          f"train.max_steps={STEPS}", "ibot.separate_head=true", "checkpoint.every_n_steps=100",
                          f"distributed.replicate_degree={replicate}"]
    single_dir, dist_dir = tmp_path / "single", tmp_path / "dist"
    Trainer(load_config(None, common + ["train.batch_size_per_gpu=8", "distributed.launcher=single"]),
            single_dir).fit()
    ranks = run_ranks(_train, 2, tmp_path / "ranks", common + ["train.batch_size_per_gpu=4"], str(dist_dir))
    assert [(r["rank"], r["world_size"], r["mesh"]) for r in ranks] == [(0, 2, mesh), (1, 2, mesh)]

    single, distributed = _losses(single_dir), _losses(dist_dir)
    assert [s[0] for s in distributed] == list(range(1, STEPS + 1))
    for a, b in zip(single, distributed):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (a, b)
    # The loss moves between steps, so the agreement is not that of a constant.
    assert abs(single[0][1] - single[-1][1]) > 1e-3

    # Updated student, EMA teacher and loss centers, from the 2-rank sharded checkpoint.
    reference = read_tensors(resolve_checkpoint(single_dir), "model.")
    sharded = read_tensors(resolve_checkpoint(dist_dir), "model.")
    assert sharded.keys() == reference.keys()
    initial = Trainer(load_config(None, common + ["train.batch_size_per_gpu=8", "distributed.launcher=single"]),
                      tmp_path / "fresh", resume=False).model.state_dict()
    moved = 0
    for key, value in reference.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6, msg=key)
        moved += not torch.equal(value, initial[key.removeprefix("model.")])
    assert moved > len(reference) // 2  # most tensors changed during the 3 steps
