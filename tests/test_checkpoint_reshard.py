"""Sharded checkpoints resume on another world size: 2 ranks -> 1 process -> 2 ranks.

The same recipe (``train.global_batch_size=8``) runs on 2 gloo ranks (4 per rank, asynchronous
saves) and on 1 process (8): each resume continues at the same global sample and gives the same
next-step loss as the run it was cut from. The 2-rank checkpoint also exports to a backbone file
that torch.hub loads.
"""

import shutil
from pathlib import Path

import pytest
import torch

from dinov2.checkpoint.export import export_backbone
from dinov2.configs import load_config
from dinov2.distributed import distributed_session
from dinov2.logging import read_metrics
from dinov2.train.train import Trainer
from gloo_ranks import DIST_TINY, run_ranks, write_dataset

REPO = Path(__file__).resolve().parents[1]


def _resume_and_train(overrides, out_dir):
    cfg = load_config(None, overrides)
    with distributed_session(cfg.distributed, cfg.compute.device) as env:
        trainer = Trainer(cfg, out_dir, env=env)
        resumed = {"step": trainer.step, "data_position": trainer.data_position,
                   "batch_size_per_gpu": trainer.cfg.train.batch_size_per_gpu}
        trainer.fit()
        return {"resumed": resumed, "data_position": trainer.data_position}


def _loss_at(run_dir, step):
    return next(m["total_loss"] for m in read_metrics(run_dir) if m["step"] == step)


def _copy_checkpoint(src_run, step, dst_run):
    name = f"step_{step:09d}"
    shutil.copytree(src_run / "checkpoints" / name, dst_run / "checkpoints" / name)


def test_reshard_two_to_one_to_two(tmp_path):
    common = DIST_TINY + [write_dataset(tmp_path / "images.npy"), "train.global_batch_size=8",
                          "train.centering=sinkhorn_knopp", "checkpoint.every_n_steps=1", "checkpoint.keep_last=3"]
    two, one, back = tmp_path / "two", tmp_path / "one", tmp_path / "back"

    # 2 ranks, 3 steps, asynchronous saves at every step.
    ranks = run_ranks(_resume_and_train, 2, tmp_path / "r1", common + ["train.max_steps=3", "checkpoint.async_save=true"],
                      str(two))
    assert [r["resumed"]["batch_size_per_gpu"] for r in ranks] == [4, 4]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [f"step_00000000{i}" for i in (1, 2, 3)]

    # 2 -> 1: resume the step-2 checkpoint in one process; step 3 must match the 2-rank run.
    _copy_checkpoint(two, 2, one)
    single = Trainer(load_config(None, common + ["train.max_steps=4", "distributed.launcher=single"]), one)
    assert (single.step, single.data_position, single.cfg.train.batch_size_per_gpu) == (2, 16, 8)
    single.fit()
    assert _loss_at(one, 3) == pytest.approx(_loss_at(two, 3), rel=1e-5)

    # 1 -> 2: resume the 1-process step-3 checkpoint on 2 ranks; step 4 must match the 1-process run.
    _copy_checkpoint(one, 3, back)
    ranks = run_ranks(_resume_and_train, 2, tmp_path / "r2", common + ["train.max_steps=4"], str(back))
    assert [r["resumed"] for r in ranks] == [{"step": 3, "data_position": 24, "batch_size_per_gpu": 4}] * 2
    assert [r["data_position"] for r in ranks] == [32, 32]
    assert _loss_at(back, 4) == pytest.approx(_loss_at(one, 4), rel=1e-5)
    assert _loss_at(one, 4) != pytest.approx(_loss_at(one, 3), rel=1e-3)

    # The 2-rank checkpoint exports to the released layout; torch.hub loads it and computes
    # the same features as the teacher the 1-process run resumed from it.
    info = export_backbone(two / "checkpoints" / "step_000000002", tmp_path / "teacher.pth")
    entry, kwargs = info["hub_entry"]
    assert entry == "dinov2_vits14" and kwargs["embed_dim"] == 32 and kwargs["img_size"] == 28
    hub = torch.hub.load(str(REPO), entry, source="local", weights=info["out"], **kwargs).eval()
    resumed = Trainer(load_config(None, common + ["train.max_steps=4", "distributed.launcher=single"]),
                      tmp_path / "two_step2", resume=False)
    _copy_checkpoint(two, 2, tmp_path / "two_step2")
    resumed.load_checkpoint(tmp_path / "two_step2" / "checkpoints" / "step_000000002")
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(hub(images), resumed.model.teacher.backbone(images))
