"""Recipe phases on tiny models: the high-resolution phase (switch at the exact step, resume inside it and
right at the switch bitwise), ``train.init_from`` (a new run from another run's model), their bad inputs."""

import pytest
import torch

from dinov2.configs import ConfigError, load_config
from dinov2.data.mnist import MNISTDemoDataset
from dinov2.logging import read_metrics
from dinov2.train.build import build_train_loader
from dinov2.train.phases import PhasedBatches, plan_phases
from dinov2.cli.train import main
from dinov2.train.train import Trainer
from tiny import TINY

# 6 scheduled steps (3 x 2 epochs); the last 2 at 35 px global / 21 px local crops, batch 4 (patch 7).
SHORT = ["train.OFFICIAL_EPOCH_LENGTH=3", "checkpoint.every_n_steps=100"]
HIGH_RES = ["high_res.steps=2", "high_res.global_crops_size=35", "high_res.local_crops_size=21",
            "high_res.batch_size_per_gpu=4"]


def tiny_cfg(*extra):
    return load_config(None, TINY + SHORT + list(extra))


def test_plan_switches_at_the_end_of_the_schedules_not_at_max_steps():
    plan = plan_phases(tiny_cfg(*HIGH_RES, "train.max_steps=3"), scheduled_steps=6)
    assert plan.switch_step == 4
    assert [plan.at(step).name for step in range(6)] == ["main"] * 4 + ["high_res"] * 2
    assert plan.at(5).log_values() == {"global_crops_size": 35, "local_crops_size": 21, "batch_size_per_gpu": 4,
                                       "high_res_phase": 1}
    assert plan_phases(tiny_cfg(), 6).at(5).name == "main"  # high_res.steps=0: off
    # null local size / batch: the main phase's
    high = plan_phases(tiny_cfg("high_res.steps=1", "high_res.global_crops_size=42"), 6).high_res
    assert (high.local_crops_size, high.batch_size_per_gpu) == (14, 8)


def test_loader_switches_crops_masks_and_batch_size_at_the_exact_position():
    cfg = tiny_cfg(*HIGH_RES)
    plan = plan_phases(cfg, 6)
    dataset = MNISTDemoDataset()
    batches = PhasedBatches(plan, cfg, lambda c, start: build_train_loader(c, dataset, start=start), start=24,
                            skipped_files=set())
    before = batches.next(3)  # the last main-phase step: 8 images at 28 px, 4x4 patch grid
    assert before.global_crops.shape[-2:] == (28, 28) and before.masks.shape == (16, 16)
    assert batches.position == 32
    after = batches.next(4)  # the switch: a new loader at position 32, 4 images at 35 px (5x5), locals 21 px
    assert after.global_crops.shape == (8, 1, 35, 35) and after.local_crops.shape[-1] == 21
    assert after.masks.shape == (8, 25) and after.masks.sum() > 0
    assert batches.position == 36
    # The same batch as a loader built directly at that position with the phase's config (resume).
    direct = next(iter(build_train_loader(plan.config_for(cfg, plan.high_res), dataset, start=32)))
    assert torch.equal(direct.global_crops, after.global_crops) and torch.equal(direct.masks, after.masks)
    batches.close()
    assert batches.position == 36


@pytest.mark.parametrize("override,message", [
    ("high_res.global_crops_size=36", "high_res.global_crops_size=36 is not a multiple of student.patch_size=7"),
    ("high_res.local_crops_size=20", "high_res.local_crops_size=20 is not a multiple"),
    ("high_res.steps=7", "high_res.steps=7 is larger than the run"),
])
def test_bad_high_res_settings_fail_before_training(tmp_path, capsys, override, message):
    assert main(["--output-dir", str(tmp_path), *TINY, *SHORT, *HIGH_RES, override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_high_res_phase_resumes_bitwise_inside_it_and_at_the_switch(tmp_path):
    cfg = tiny_cfg(*HIGH_RES)
    Trainer(cfg, tmp_path / "full").fit()
    full = read_metrics(tmp_path / "full")
    assert [m["global_crops_size"] for m in full] == [28] * 4 + [35] * 2
    assert [m["batch_size_per_gpu"] for m in full] == [8] * 4 + [4] * 2
    full_state = Trainer(cfg, tmp_path / "full").model.state_dict()
    for stop in (4, 5):  # right at the switch, inside the phase
        run = tmp_path / f"split{stop}"
        Trainer(tiny_cfg(*HIGH_RES, f"train.max_steps={stop}"), run).fit()
        resumed = Trainer(cfg, run)
        assert resumed.step == stop
        resumed.fit()
        assert resumed.data_position == 4 * 8 + 2 * 4
        assert [(m["step"], m["total_loss"]) for m in read_metrics(run)] == [(m["step"], m["total_loss"]) for m in full]
        for key, value in resumed.model.state_dict().items():
            assert torch.equal(value, full_state[key]), (stop, key)


def test_init_from_loads_model_with_fresh_optimizer_and_resampled_pos_embed(tmp_path):
    Trainer(tiny_cfg("train.max_steps=2"), tmp_path / "source").fit()
    source = Trainer(tiny_cfg("train.max_steps=2"), tmp_path / "source")
    new = Trainer(tiny_cfg(f"train.init_from={tmp_path / 'source'}", "crops.global_crops_size=35"), tmp_path / "new")
    assert new.step == 0 and new.data_position == 0 and not new.optimizer.state
    old_state, new_state = source.model.state_dict(), new.model.state_dict()
    assert set(old_state) == set(new_state)
    assert any("center" in key for key in new_state)  # the loss centers come along
    for key, value in new_state.items():
        if key.endswith("pos_embed"):
            assert value.shape == (1, 1 + 25, 32) and old_state[key].shape == (1, 1 + 16, 32)
            assert torch.equal(value[:, :1], old_state[key][:, :1])  # the class token's is kept
        else:
            assert torch.equal(value, old_state[key]), key
    # The new run's features at its own size are the source's at that size (pos-embed resampled alike).
    images = torch.randn(2, 1, 35, 35)
    for name in ("student", "teacher"):
        old_backbone, new_backbone = getattr(source.model, name).backbone.eval(), getattr(new.model, name).backbone.eval()
        torch.testing.assert_close(new_backbone(images), old_backbone(images), rtol=0, atol=1e-5)
    new.close()
    source.close()


def test_init_from_a_directory_without_checkpoint_fails_before_training(tmp_path, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    for target in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["--output-dir", str(tmp_path / "new"), *TINY, f"train.init_from={target}"]) == 2
        err = capsys.readouterr().err
        assert f"train.init_from={target}" in err and ("no complete checkpoint" in err or "no such directory" in err)
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_init_from_with_pretrained_weights_is_one_config_error_naming_both_keys(tmp_path, capsys):
    # Both set the student's starting weights; init_from used to win silently.
    both = [f"train.init_from={tmp_path / 'source'}", f"student.pretrained_weights={tmp_path / 'backbone.pth'}"]
    with pytest.raises(ConfigError, match=r"train\.init_from=.*student\.pretrained_weights="):
        tiny_cfg(*both)
    assert main(["--output-dir", str(tmp_path / "new"), *TINY, *both]) == 2
    assert "set only one" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
