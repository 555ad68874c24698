"""The single-machine trainer end to end on tiny models: loss falls, resume is bitwise exact,
checkpoints are atomic, non-finite losses are skipped and stop the run with a clear message."""

import json
import shutil

import numpy as np
import pytest
import torch

from dinov2.configs import load_config
from dinov2.logging import read_metrics
from dinov2.cli.train import main
from dinov2.train.train import NonFiniteLossError, Trainer
from tiny import TINY



def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def losses(run_dir):
    return [(m["step"], m["total_loss"]) for m in read_metrics(run_dir)]


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_resume_reproduces_uninterrupted_run_bitwise(tmp_path, centering):
    cfg = tiny_cfg(f"train.centering={centering}", "ibot.separate_head=true")
    Trainer(cfg, tmp_path / "full").fit()
    # Stop after 3 steps (a checkpoint is written there), then resume in a fresh Trainer.
    Trainer(tiny_cfg(f"train.centering={centering}", "ibot.separate_head=true", "train.max_steps=3"),
            tmp_path / "split").fit()
    resumed = Trainer(cfg, tmp_path / "split")
    assert resumed.step == 3
    resumed.fit()
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    full = Trainer(cfg, tmp_path / "full").model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, full[key]), key


def test_checkpoint_keeps_last_and_ignores_partial_saves(tmp_path):
    trainer = Trainer(tiny_cfg("checkpoint.every_n_steps=1", "checkpoint.keep_last=2"), tmp_path)
    trainer.fit()
    steps = [s for s, _ in trainer.checkpoints.checkpoints()]
    assert steps == [7, 8]
    # A save killed half-way leaves a partial directory that is never picked up.
    partial = tmp_path / "checkpoints" / ".step_000000009.partial"
    shutil.copytree(tmp_path / "checkpoints" / "step_000000008", partial)
    (partial / ".metadata").unlink()
    assert trainer.checkpoints.latest()[0] == 8


def test_training_reduces_the_loss(tmp_path):
    # Early DINO losses rise while the teacher sharpens and its center moves; with a frozen
    # teacher, Sinkhorn targets (no center) and a constant temperature the targets are fixed,
    # so the student's only job is to match them and the loss must fall.
    cfg = tiny_cfg("optim.epochs=6", "optim.base_lr=0.05", "student.drop_path_rate=0.0", "teacher.momentum_teacher=1.0",
                   "teacher.warmup_teacher_temp=0.07", "dino.koleo_loss_weight=0", "train.centering=sinkhorn_knopp")
    Trainer(cfg, tmp_path).fit()
    values = [loss for _, loss in losses(tmp_path)]
    assert np.mean(values[-4:]) < np.mean(values[:4]) - 0.5, values


def test_nonfinite_loss_is_skipped_counted_and_stops(tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg("train.max_nonfinite_steps=2", "checkpoint.every_n_steps=1"), tmp_path)
    real_forward = trainer.model.forward
    calls = {"n": 0}

    def sometimes_nan(batch, teacher_temp):
        calls["n"] += 1
        loss, logs = real_forward(batch, teacher_temp)
        return (loss * float("nan"), logs) if calls["n"] >= 3 else (loss, logs)

    monkeypatch.setattr(trainer.model, "forward", sometimes_nan)
    before = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* on 2 steps.*last good checkpoint is .*step_00000000[23]"):
        trainer.fit()
    assert trainer.nonfinite_steps == 2
    assert not any(torch.equal(before[k], v) for k, v in trainer.model.student.state_dict().items() if "weight" in k)
    assert all(torch.isfinite(v).all() for v in trainer.model.student.state_dict().values())


def test_cli_writes_config_and_rejects_unknown_keys(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path / "bad"), *TINY, "optim.base_rl=1"]) == 2
    assert "did you mean 'optim.base_lr'" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path / "ok"), *TINY, "train.max_steps=1"]) == 0
    saved = (tmp_path / "ok" / "config.yaml").read_text()
    assert "embed_dim: 32" in saved
    assert json.loads((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
