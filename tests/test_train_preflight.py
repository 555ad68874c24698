"""Before a run: ``train.OFFICIAL_EPOCH_LENGTH: auto``, ``dinov2-train --print-config`` and ``--dry-run``
(numbers that agree with what the trainer then does, warnings, nothing written to the run directory)."""

import math
import os
import subprocess
import sys

import pytest
import yaml

from dinov2.configs import ConfigError, SSLConfig, load_config
from dinov2.configs.reference import format_config, key_reference
from dinov2.configs.ranges import schema_fields
from dinov2.train.preflight import plan_warnings, preflight
from dinov2.train.run_dir import RunLock
from dinov2.train.run_plan import plan_run, steps_per_epoch
from dinov2.cli.train import main
from dinov2.train.train import Trainer
from gloo_ranks import write_dataset
from tiny import TINY


@pytest.mark.parametrize("images, batch, expected", [(144, 32, 5), (128, 32, 4), (1, 32, 1), (10_000, 32, 313)])
def test_auto_epoch_is_one_pass_over_the_data(images, batch, expected):
    assert steps_per_epoch("auto", images, batch) == expected == math.ceil(images / batch)
    assert steps_per_epoch(1250, images, batch) == 1250  # an integer keeps the official meaning


def test_auto_epoch_length_drives_the_trainer(tmp_path):
    data = write_dataset(tmp_path / "images.npy", n=20)  # batch 8: 3 steps per epoch, 2 epochs
    cfg = load_config(None, TINY + [data, "train.OFFICIAL_EPOCH_LENGTH=auto"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.cfg.train.OFFICIAL_EPOCH_LENGTH == 3 and trainer.total_steps == 6
    # The lr warmup is 1 epoch = 3 steps (np.linspace endpoint: the peak at step 2).
    assert trainer.schedules.lr(2) == pytest.approx(plan_run(cfg, 20).peak_lr)
    assert trainer.schedules.lr(1) < trainer.schedules.lr(2)
    assert trainer.fit()["step"] == 6
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.train.OFFICIAL_EPOCH_LENGTH == 3  # the run's config records what it did


def test_auto_epoch_length_is_validated():
    assert load_config(None, ["train.OFFICIAL_EPOCH_LENGTH=auto"]).train.OFFICIAL_EPOCH_LENGTH == "auto"
    assert load_config(None, ["train.OFFICIAL_EPOCH_LENGTH=12"]).train.OFFICIAL_EPOCH_LENGTH == 12
    with pytest.raises(ValueError, match=r"train.OFFICIAL_EPOCH_LENGTH='many' is out of range: must be >= 1 or 'auto'"):
        load_config(None, ["train.OFFICIAL_EPOCH_LENGTH=many"])
    with pytest.raises(ValueError, match=r"OFFICIAL_EPOCH_LENGTH=0 is out of range"):
        load_config(None, ["train.OFFICIAL_EPOCH_LENGTH=0"])


def test_run_plan_numbers_by_hand():
    cfg = load_config("train/vits14.yaml", ["train.OFFICIAL_EPOCH_LENGTH=1250"])
    plan = plan_run(cfg, num_images=110)
    assert plan.steps_per_epoch == 1250 and plan.total_steps == 500 * 1250
    assert plan.passes == pytest.approx(500 * 1250 * 64 / 110)
    assert plan.peak_lr == pytest.approx(2e-4 * math.sqrt(64 / 1024))  # sqrt_wrt_1024
    assert plan.warmup_steps == 80 * 1250


# --- --print-config ---------------------------------------------------------------------------------

def test_every_key_has_a_one_line_description():
    missing = [key for key, _, item in schema_fields(SSLConfig) if not item.metadata.get("doc")]
    assert not missing, f"keys without a description (doc=...) in schema.py: {missing}"
    assert all("\n" not in entry["doc"] for entry in key_reference())


def test_print_config_is_a_commented_recipe_that_loads_back(tmp_path, capsys):
    overrides = ["train.OFFICIAL_EPOCH_LENGTH=auto", "optim.base_lr=0.001", "crops.global_crops_scale=[0.4,1.0]"]
    assert main(["--config", "train/small_rgb.yaml", "--print-config", *overrides]) == 0
    text = capsys.readouterr().out
    keys = [key for key, _, _ in schema_fields(SSLConfig)]
    for key in keys:  # every key, once, under its section
        assert sum(line.startswith(f"  {key.split('.')[1]}:") for line in text.splitlines()) >= 1, key
    assert "  base_lr: 0.001  # peak learning rate" in text and "[default 0.004 (changed); > 0]" in text
    assert "  precision: fp32  # autocast precision" in text and "one of fp32, bf16, fp16]" in text
    assert "  OFFICIAL_EPOCH_LENGTH: auto  #" in text and ">= 1 or 'auto'" in text
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert len(yaml.safe_load(text)) == len({key.split(".")[0] for key in keys})
    assert load_config(path) == load_config("train/small_rgb.yaml", overrides)


def test_print_config_needs_no_output_dir_but_training_does(capsys):
    with pytest.raises(SystemExit):
        main(["--config", "train/small_rgb.yaml"])
    assert "--output-dir is required" in capsys.readouterr().err


def test_format_config_marks_only_changed_values():
    text = format_config(load_config(None))
    assert "(changed)" not in text


# --- --dry-run ----------------------------------------------------------------------------------------

def _photos(root, n=12):
    from PIL import Image
    import numpy as np

    root.mkdir()
    rng = np.random.default_rng(0)
    for index in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{index}.jpg")
    return root


def test_dry_run_numbers_warnings_and_no_trace_in_the_run_directory(tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    args = ["--output-dir", str(run), "--dry-run", "--dry-run-steps", "1", f"data.dataset=folder:{photos}",
            "student.arch=vit_small", "student.embed_dim=32", "student.depth=1", "student.num_heads=2",
            "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=1",
            "dino.head_n_prototypes=65536", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
            "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16", "ibot.head_n_prototypes=32",
            "train.batch_size_per_gpu=4", "data.num_workers=0", "compute.precision=bf16", "compute.device=cpu"]
    with RunLock(run):  # a run holds the directory: the dry run neither waits for nor takes the lock
        before = {name: (run / name).read_bytes() for name in os.listdir(run)}
        assert main(args) == 0
        assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before  # nothing written
    out = capsys.readouterr().out
    # vitl14's defaults: epochs 100 x 1250 steps x 4 images over 12 images.
    assert "12 images" in out and "steps per epoch:  1,250 (417 passes over the data)" in out
    assert "total steps:      125,000 = 100 epochs" in out and "passes over data: 41,666.7" in out
    assert f"peak lr:          {0.004 * math.sqrt(4 / 1024):.3g} after batch scaling" in out
    assert "s per step (timed) -> ETA" in out
    assert "WARNING:" in out and "passes over 12 images" in out and "OFFICIAL_EPOCH_LENGTH=auto" in out
    assert "compute.precision=bf16 on a CPU" in out and "dino.head_n_prototypes=65,536 for 12 images" in out


def test_dry_run_reads_the_step_a_resume_starts_from(tmp_path):
    data = write_dataset(tmp_path / "images.npy", n=16)
    cfg = load_config(None, TINY + [data, "train.max_steps=3"])
    Trainer(cfg, tmp_path / "run").fit()
    report = preflight(load_config(None, TINY + [data]), tmp_path / "run", timed_steps=0)
    assert report.resume_step == 3 and report.plan.total_steps == 8 and report.step_seconds is None
    assert report.parameters["backbone"] == sum(
        p.numel() for p in Trainer(cfg, tmp_path / "other").model.student.backbone.parameters())


def test_a_sensible_small_recipe_gets_no_warning():
    import torch

    cfg = load_config("train/small_rgb.yaml", ["data.dataset=folder:unused"])
    assert plan_warnings(cfg, plan_run(cfg, num_images=150), torch.device("cpu")) == []


def test_cli_dry_run_subprocess_exit_code_and_help():
    result = subprocess.run([sys.executable, "-m", "dinov2.cli.train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--dry-run" in result.stdout and "--print-config" in result.stdout


def test_a_real_run_says_what_the_dry_run_warns_about(tmp_path, caplog):
    data = write_dataset(tmp_path / "images.npy", n=16)
    cfg = load_config(None, TINY + [data, "train.OFFICIAL_EPOCH_LENGTH=1250", "optim.epochs=100"])
    with caplog.at_level("WARNING", logger="dinov2.train"):
        trainer = Trainer(cfg, tmp_path / "run")  # constructing it is enough: the warning comes first
    trainer.close()
    assert "62,500 passes over 16 images" in caplog.text and "OFFICIAL_EPOCH_LENGTH=auto" in caplog.text


@pytest.mark.parametrize("bad,message", [
    (["high_res.steps=9"], "high_res.steps=9 is larger than the run"),  # TINY: 2 epochs x 4 steps
    (["high_res.steps=2", "high_res.global_crops_size=30"], "high_res.global_crops_size=30 is not a multiple"),
    (["high_res.steps=2", "high_res.global_crops_size=35", "high_res.local_crops_size=20"],
     "high_res.local_crops_size=20 is not a multiple"),
])
def test_dry_run_checks_the_high_res_phase_as_the_real_run_does(tmp_path, capsys, bad, message):
    data = write_dataset(tmp_path / "images.npy", n=16)
    with pytest.raises(ConfigError, match=message):  # no timed step: the check itself, not the Trainer's
        preflight(load_config(None, TINY + [data, *bad]), None, timed_steps=0)
    with pytest.raises(ConfigError, match=message):  # the real run says the same
        Trainer(load_config(None, TINY + [data, *bad]), tmp_path / "run")
    assert main(["--dry-run", "--dry-run-steps", "0", *TINY, data, *bad]) == 2
    assert message in capsys.readouterr().err


def test_dry_run_shows_the_high_res_phase(tmp_path, capsys):
    data = write_dataset(tmp_path / "images.npy", n=16)
    high = ["high_res.steps=3", "high_res.global_crops_size=35", "high_res.batch_size_per_gpu=4"]
    assert main(["--dry-run", "--dry-run-steps", "0", *TINY, data, *high]) == 0
    assert "high resolution:  steps 5-7: global crops 35 px, local 14 px, batch 4 per process" in capsys.readouterr().out
