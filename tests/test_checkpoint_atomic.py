"""Checkpoints are whole or absent: a process killed during a save resumes from the previous one;
asynchronous saves snapshot the state at save time; a checkpoint of another architecture is
refused with the mismatching keys named."""

import pathlib
import time

import pytest
import torch

from dinov2.checkpoint import CheckpointManager, CheckpointMismatchError
from dinov2.configs import load_config
from dinov2.cli.train import main
from dinov2.train.train import Trainer
from gloo_ranks import DIST_TINY, fork_process, write_dataset

SINGLE = [x for x in DIST_TINY if not x.startswith("distributed.launcher")] + ["distributed.launcher=single"]


def _train_and_hang_in_the_rename_of_step_2(overrides, run_dir, marker):
    # Everything of step 2 is written (shards and .metadata) when the publishing rename starts:
    # the worst moment to die, as the partial directory looks complete.
    rename = pathlib.Path.rename

    def hanging_rename(self, target):
        if self.name == ".step_000000002.partial":
            pathlib.Path(marker).touch()
            time.sleep(600)
        return rename(self, target)

    pathlib.Path.rename = hanging_rename
    Trainer(load_config(None, overrides), run_dir).fit()


def test_a_process_killed_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    overrides = SINGLE + [write_dataset(tmp_path / "images.npy"), "train.max_steps=3", "checkpoint.every_n_steps=1"]
    run_dir, marker = tmp_path / "run", tmp_path / "in_rename"
    process = fork_process(_train_and_hang_in_the_rename_of_step_2, overrides, run_dir, marker)
    deadline = time.monotonic() + 180
    while not marker.exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.kill()
    process.join()
    assert marker.exists(), "the child never reached the save of step 2"

    partial = run_dir / "checkpoints" / ".step_000000002.partial"
    assert (partial / ".metadata").exists()  # complete data, but never published
    manager = CheckpointManager(run_dir / "checkpoints")
    assert [step for step, _ in manager.checkpoints()] == [1]

    trainer = Trainer(load_config(None, overrides), run_dir)
    assert trainer.step == 1 and trainer.data_position == 8
    trainer.fit()
    assert [step for step, _ in manager.checkpoints()] == [1, 2, 3]
    assert not partial.exists()  # the stale partial save was cleaned up by the next publish


def test_async_save_snapshots_the_state_and_publishes_on_wait(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1, async_save=True)
    weight = torch.arange(6.0)
    manager.save(1, {"model": {"w": weight}, "progress": {"step": 1}})
    weight.mul_(100)  # training goes on while the background write runs
    assert manager.checkpoints() == []  # not published before the write is known to be complete
    manager.save(2, {"model": {"w": weight}, "progress": {"step": 2}})  # waits for and publishes step 1 first
    manager.wait()
    assert [s for s, _ in manager.checkpoints()] == [2]  # keep_last=1 removed step 1
    state = {"model": {"w": torch.zeros(6)}, "progress": {"step": 0}}
    manager.load(state, manager.latest()[1])
    assert torch.equal(state["model"]["w"], torch.arange(6.0) * 100) and state["progress"]["step"] == 2

    other = CheckpointManager(tmp_path / "b", async_save=True)
    other.save(1, {"model": {"w": weight.clone()}})
    weight.zero_()
    other.wait()
    loaded = {"model": {"w": torch.empty(6)}}
    other.load(loaded, other.latest()[1])
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0) * 100)


def test_a_checkpoint_of_another_architecture_names_the_mismatching_keys(tmp_path, capsys):
    common = SINGLE + [write_dataset(tmp_path / "images.npy"), "train.max_steps=1"]
    Trainer(load_config(None, common), tmp_path / "run").fit()
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint: .*student\.backbone\.blocks\.2\."):
        Trainer(load_config(None, common + ["student.depth=3"]), tmp_path / "run")
    with pytest.raises(CheckpointMismatchError,
                       match=r"shape mismatches: .*student\.backbone\.cls_token: checkpoint \(1, 1, 32\) vs run \(1, 1, 48\)"):
        Trainer(load_config(None, common + ["student.embed_dim=48"]), tmp_path / "run")
    assert main(["--output-dir", str(tmp_path / "run"), *common, "student.depth=1"]) == 2
    assert "model: keys in the checkpoint but not in the run: student.backbone.blocks.1." in capsys.readouterr().err
