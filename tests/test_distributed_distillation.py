"""Distillation over 2 real gloo processes equals one process on the same global batch.

The frozen teacher, the student and the student's EMA are FSDP2-sharded over both ranks (the teacher built
on the meta device and its weights written into the shards); with trained heads (a run directory: heads and
loss centers loaded) and with k-means heads (an exported file: every rank fits the same heads). One process
with batch 2B and two ranks with B each see the same global batch, so both ranks log the same losses, and
those, the saved student, its EMA and the teacher agree with the single process to float tolerance.
"""

import pytest
import torch

from dinov2.checkpoint.export import export_backbone, read_tensors, resolve_checkpoint
from dinov2.configs import load_config
from dinov2.logging import read_metrics
from dinov2.train.train import Trainer, run
from gloo_ranks import DIST_TINY, run_ranks, write_dataset

STEPS = 3
STUDENT = ["student.embed_dim=16", "student.depth=1", "student.num_heads=2", "distillation.kmeans_images=16"]


def _train(overrides, out_dir):
    result, env = run(load_config(None, overrides), out_dir)
    return {"rank": env.rank, "world_size": env.world_size, "result": result}


def _losses(run_dir):
    return [(m["step"], m["total_loss"], m["dino_global_crops_loss"], m["ibot_loss"]) for m in read_metrics(run_dir)]


@pytest.mark.slow  # a teacher run, then 1 process + 2 gloo ranks per teacher kind: ~1 min on a loaded 2-core machine
@pytest.mark.parametrize("kind", ["run", "file"])
def test_two_gloo_ranks_distill_as_one_process(tmp_path, kind):
    data = write_dataset(tmp_path / "images.npy", n=32)
    # The teacher: a tiny run (dim 32, depth 2) trained 2 steps; its exported backbone has no heads.
    Trainer(load_config(None, DIST_TINY + [data, "train.max_steps=2", "distributed.launcher=single"]),
            tmp_path / "teacher").fit()
    teacher = tmp_path / "teacher"
    if kind == "file":
        export_backbone(teacher, tmp_path / "teacher.safetensors")
        teacher = tmp_path / "teacher.safetensors"
    common = DIST_TINY + STUDENT + [data, f"distillation.teacher={teacher}", f"train.max_steps={STEPS}",
                                    "checkpoint.every_n_steps=100"]
    single_dir, dist_dir = tmp_path / "single", tmp_path / "dist"
    Trainer(load_config(None, common + ["train.batch_size_per_gpu=8", "distributed.launcher=single"]),
            single_dir).fit()
    ranks = run_ranks(_train, 2, tmp_path / "ranks", common + ["train.batch_size_per_gpu=4"], str(dist_dir))
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    losses = [{k: v for k, v in r["result"].items() if k.endswith("_loss")} for r in ranks]
    assert losses[0] and losses[0] == losses[1]  # both ranks agree on the loss terms

    single, distributed = _losses(single_dir), _losses(dist_dir)
    assert [s[0] for s in distributed] == list(range(1, STEPS + 1))
    for a, b in zip(single, distributed):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (a, b)
    assert abs(single[0][1] - single[-1][1]) > 1e-3  # the loss moves: not the agreement of a constant

    reference = read_tensors(resolve_checkpoint(single_dir), "model.")
    sharded = read_tensors(resolve_checkpoint(dist_dir), "model.")
    assert sharded.keys() == reference.keys()
    assert any(k.startswith("model.student_ema.") for k in reference)
    for key, value in reference.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The frozen teacher is the source's, unchanged, on every rank (its shards reassembled by DCP).
    source = read_tensors(resolve_checkpoint(tmp_path / "teacher"), "model.teacher.backbone.")
    for key, value in source.items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=0, msg=key)
