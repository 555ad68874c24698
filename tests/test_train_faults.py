"""Fault injection on the trainer: each case reproduces a way a run used to lose data, and checks
that now nothing is lost. Real files, real processes and real signals; nothing of the trainer is mocked."""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2.checkpoint import CheckpointManager, CheckpointMismatchError, is_good
from dinov2.configs import load_config
from dinov2.logging import read_metrics
from dinov2.train.signals import TrainingInterrupted
from dinov2.cli.train import main
from dinov2.train.train import NonFiniteLossError, Trainer
from tiny import TINY

REPO = Path(__file__).resolve().parents[1]
FAST = TINY + ["student.drop_path_rate=0.0"]


def cfg(*extra):
    return load_config(None, FAST + list(extra))


def nan_dataset(path: Path, n: int = 32, nan_index: int = 5) -> str:
    images = np.random.RandomState(0).rand(n, 1, 28, 28).astype(np.float32)
    images[nan_index] = np.nan  # one NaN image: every crop of it is NaN
    np.save(path, images)
    return f"data.dataset=npy:{path}"


def state_snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i, group in enumerate(trainer.optimizer.state.values()):
        state.update({f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in group.items()})
    return state


@pytest.mark.parametrize("fused", ["true", "false"])  # decided on the device / on the host
def test_a_non_finite_step_leaves_no_trace(tmp_path, fused):
    trainer = Trainer(cfg(f"compute.fused_optimizer={fused}", "train.max_steps=2"), tmp_path)
    trainer.fit()  # two real steps: optimizer moments and centers are non-trivial
    trainer = Trainer(cfg(f"compute.fused_optimizer={fused}", "train.max_steps=3"), tmp_path)
    from dinov2.train.build import build_train_loader

    batch = next(iter(build_train_loader(trainer.cfg, trainer.dataset, start=trainer.data_position)))
    before = state_snapshot(trainer)
    crops = batch.global_crops.float().clone()
    crops[0, 0, 0, 0] = float("nan")
    poisoned = dataclasses.replace(batch, global_crops=crops)
    logs = trainer.train_step([poisoned])
    assert int(logs["skipped"]) == 1
    after = state_snapshot(trainer)
    assert before.keys() == after.keys()
    for key in before:  # weights, teacher, centers, AdamW moments and step counters: bitwise unchanged
        assert torch.equal(before[key], after[key]), key
    logs = trainer.train_step([batch])  # the next clean step trains as usual
    assert int(logs["skipped"]) == 0
    assert not torch.equal(before["model.student.backbone.cls_token"], trainer.model.student.backbone.cls_token)
    trainer.close()


def test_a_nan_sample_is_skipped_and_the_run_ends_finite(tmp_path):
    # The reported case: an npy dataset with one NaN pixel poisoned the centers for good.
    data = nan_dataset(tmp_path / "images.npy")
    trainer = Trainer(cfg(data, "compute.fused_optimizer=true", "checkpoint.every_n_steps=1",
                          "checkpoint.keep_last=2"), tmp_path / "run")
    trainer.fit()
    assert trainer.nonfinite_steps == 2  # the NaN image is in one batch of each of the 2 epochs
    for tensor in trainer.model.state_dict().values():
        assert torch.isfinite(tensor).all()
    steps = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert len(steps) == 8 - 2 and steps[-1] == 8  # skipped steps log nothing
    assert all(is_good(path) for _, path in trainer.checkpoints.checkpoints())


def test_the_stop_names_a_good_checkpoint_that_still_exists(tmp_path):
    data = nan_dataset(tmp_path / "images.npy", nan_index=5)  # in the 1st batch of the run's order? any one
    trainer = Trainer(cfg(data, "train.max_nonfinite_steps=1", "checkpoint.every_n_steps=1", "checkpoint.keep_last=1"),
                      tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint is (\S+)") as raised:
        trainer.fit()
    named = Path(str(raised.value).split("last good checkpoint is ")[1].split(". ")[0])
    assert named.is_dir() and is_good(named)


def test_keep_last_never_deletes_the_newest_good_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step, finite in [(1, True), (2, True), (3, False), (4, False), (5, False)]:
        manager.save(step, {"model": {"w": torch.full((2,), float(step) if finite else float("nan"))}}, finite=finite)
    assert [s for s, _ in manager.checkpoints()] == [2, 4, 5]
    assert manager.latest_good()[0] == 2


def test_no_resume_moves_the_old_run_aside(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--output-dir", str(run), *FAST, "train.max_steps=4", "checkpoint.every_n_steps=2"]) == 0
    old_metrics = (run / "metrics.jsonl").read_text()
    assert main(["--output-dir", str(run), "--no-resume", *FAST, "train.max_steps=1", "optim.base_lr=0.001"]) == 0
    archived = list((run / "previous_runs").iterdir())
    assert len(archived) == 1
    assert (archived[0] / "metrics.jsonl").read_text() == old_metrics  # nothing truncated
    assert [s for s, _ in CheckpointManager(archived[0] / "checkpoints").checkpoints()] == [2, 4]
    assert [m["step"] for m in read_metrics(run)] == [1]
    assert [s for s, _ in CheckpointManager(run / "checkpoints").checkpoints()] == [1]
    # A plain restart continues the NEW run.
    resumed = Trainer(load_config(None, FAST + ["train.max_steps=2", "optim.base_lr=0.001"]), run)
    assert resumed.step == 1
    resumed.close()


def test_a_torn_metrics_line_is_dropped_and_tensorboard_shows_each_step_once(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    overrides = ["logging.tensorboard=true", "checkpoint.every_n_steps=3"]
    Trainer(cfg(*overrides, "train.max_steps=5"), run).fit()
    # A kill after step 5 was logged but before its checkpoint, during the write of step 6's line.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000000005")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "dino')
    size_before = (run / "metrics.jsonl").stat().st_size
    trainer = Trainer(cfg(*overrides, "train.max_steps=5"), run)
    assert "torn last line" in caplog.text and "metrics.jsonl" in caplog.text
    assert trainer.step == 3
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    assert (run / "metrics.jsonl").stat().st_size < size_before
    assert not list(run.glob(".metrics.jsonl.tmp"))
    trainer.fit()
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total_loss")] == [1, 2, 3, 4, 5]  # grouped TensorBoard tags


def test_a_rejected_resume_leaves_the_config_as_it_was(tmp_path):
    run = tmp_path / "run"
    Trainer(cfg("train.max_steps=1"), run).fit()
    saved = (run / "config.yaml").read_text()
    with pytest.raises(CheckpointMismatchError):
        Trainer(cfg("train.max_steps=1", "student.embed_dim=48"), run)
    assert (run / "config.yaml").read_text() == saved


def _damage(checkpoint: Path, how: str) -> None:
    if how == "truncated shard":
        shard = next(checkpoint.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "deleted shard":
        next(checkpoint.glob("*.distcp")).unlink()
    elif how == "truncated metadata":
        metadata = checkpoint / ".metadata"
        metadata.write_bytes(metadata.read_bytes()[:100])


@pytest.mark.parametrize("how", ["truncated shard", "deleted shard", "truncated metadata"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, how):
    run = tmp_path / "run"
    Trainer(cfg("train.max_steps=3", "checkpoint.every_n_steps=1"), run).fit()
    reference = Trainer(cfg("train.max_steps=3"), tmp_path / "reference")
    reference.fit()
    _damage(run / "checkpoints" / "step_000000003", how)
    trainer = Trainer(cfg("train.max_steps=3", "checkpoint.every_n_steps=1"), run)
    assert trainer.step == 2
    assert "step_000000003" in caplog.text
    trainer.fit()  # redoes step 3 exactly
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[key]), key


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(cfg("train.max_steps=1"), run).fit()
    _damage(run / "checkpoints" / "step_000000001", "truncated metadata")
    assert main(["--output-dir", str(run), *FAST, "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "dinov2-train: error: no checkpoint in" in err and "can be read" in err and "--no-resume" in err


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def test_a_full_disk_during_a_save_is_a_clear_error_and_keeps_older_checkpoints(tmp_path):
    run = tmp_path / "run"
    Trainer(cfg("train.max_steps=1"), run).fit()
    shard_bytes = next((run / "checkpoints" / "step_000000001").glob("*.distcp")).stat().st_size

    def limit_file_size():  # writes past this size fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (shard_bytes // 2, shard_bytes // 2))

    code = ("import sys; from dinov2.cli.train import main; from tiny import TINY; "
            f"sys.exit(main(['--output-dir', {str(run)!r}, *TINY, 'student.drop_path_rate=0.0', 'train.max_steps=2']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(),
                          preexec_fn=limit_file_size, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "could not write a checkpoint in" in done.stderr and "Traceback" not in done.stderr
    assert [s for s, _ in CheckpointManager(run / "checkpoints").checkpoints()] == [1]
    assert not list((run / "checkpoints").glob(".step_*"))  # the partial save was removed
    assert Trainer(cfg("train.max_steps=2"), run).step == 1  # and the older one still loads


def test_a_second_run_in_the_same_directory_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from dinov2.train.run_dir import RunLock; RunLock({str(run)!r}).acquire(); "
                               "print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=_child_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["--output-dir", str(run), *FAST, "train.max_steps=1"]) == 2
        err = capsys.readouterr().err
        assert "in use by" in err and f'"pid": {holder.pid}' in err
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["--output-dir", str(run), *FAST, "train.max_steps=1"]) == 0  # a dead holder blocks nothing


def _wait_for_metrics(run: Path, lines: int, process: subprocess.Popen, deadline: float = 300) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end and process.poll() is None:
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run never logged {lines} steps: {process.communicate()[1][-2000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_saves_and_exits_cleanly(tmp_path, signum):
    run = tmp_path / "run"
    args = [*FAST, "checkpoint.every_n_steps=100", "train.max_steps=8"]
    process = subprocess.Popen([sys.executable, "-m", "dinov2.cli.train", "--output-dir", str(run), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
    _wait_for_metrics(run, 2, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err and f"stopped on {signal.Signals(signum).name}" in err
    saved = [s for s, _ in CheckpointManager(run / "checkpoints").checkpoints()]
    logged = [m["step"] for m in read_metrics(run)]
    assert saved == [logged[-1]] and 2 <= saved[0] < 8  # the work up to the stop is kept
    assert main(["--output-dir", str(run), *args]) == 0
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 9))


def test_a_launcher_signal_handler_runs_after_the_checkpoint(tmp_path):
    # submitit checkpoints-and-requeues on SIGUSR2 through its own Python handler: it must still run,
    # and find the checkpoint of the interrupted step already written.
    run = tmp_path / "run"
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(
        [s for s, _ in CheckpointManager(run / "checkpoints").checkpoints()]))
    try:
        trainer = Trainer(cfg("checkpoint.every_n_steps=100", "train.max_steps=8"), run)
        original = trainer.train_step

        def step_then_signal(batches):  # the signal arrives during step 2
            logs = original(batches)
            if trainer.step == 1:
                os.kill(os.getpid(), signal.SIGUSR2)
            return logs

        trainer.train_step = step_then_signal
        with pytest.raises(TrainingInterrupted):
            trainer.fit()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [[2]]


def test_a_crafted_checkpoint_metadata_stops_the_resume_without_running_code(tmp_path, capsys):
    from crafted import write_crafted_metadata

    run, marker = tmp_path / "run", tmp_path / "ran"
    Trainer(cfg("train.max_steps=2", "checkpoint.every_n_steps=1"), run).fit()
    write_crafted_metadata(run / "checkpoints" / "step_000000002", marker)
    assert main(["--output-dir", str(run), *FAST, "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "step_000000002" in err and "refused" in err
    assert not marker.exists()


def test_skipped_files_count_each_file_once_and_survive_a_resume(tmp_path):
    # Two unreadable files met in both epochs: 2 files, not 4 skip events, and still 2 after a resume.
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i in range(14):
        Image.fromarray(rng.randint(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    for name in ("bad_a.png", "bad_b.png"):
        (folder / name).write_bytes(b"not an image")
    overrides = [f"data.dataset=folder:{folder}", "checkpoint.every_n_steps=4"]
    Trainer(cfg(*overrides, "train.max_steps=4"), tmp_path / "run").fit()
    Trainer(cfg(*overrides), tmp_path / "run").fit()  # resumes at step 4, ends at 8 (2 passes over 16 files)
    counts = [m["skipped_files"] for m in read_metrics(tmp_path / "run")]
    assert counts[-1] == 2 and counts == sorted(counts)


def _nan_step_on_rank(overrides, out_dir):
    from dinov2.distributed import distributed_session
    from dinov2.train.build import build_train_loader

    cfg_ = load_config(None, overrides)
    with distributed_session(cfg_.distributed, cfg_.compute.device) as env:
        trainer = Trainer(cfg_, out_dir, env=env)
        batches = iter(build_train_loader(cfg_, trainer.dataset, start=0, rank=env.rank, world_size=env.world_size))
        trainer.step = 2
        trainer.train_step([next(batches)])  # optimizer state exists
        local = {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in trainer.model.state_dict().items()}
        batch = next(batches)
        if env.rank == 1:  # only one rank sees the NaN: both must skip
            crops = batch.global_crops.float().clone()
            crops[0] = float("nan")
            batch = dataclasses.replace(batch, global_crops=crops)
        logs = trainer.train_step([batch])
        after = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in trainer.model.state_dict().items()}
        unchanged = all(torch.equal(local[k], after[k]) for k in local)
        clean = trainer.train_step([next(batches)])
        trainer.close()
        return {"skipped": int(logs["skipped"]), "unchanged": unchanged, "then": int(clean["skipped"])}


def test_a_non_finite_step_on_one_rank_is_skipped_by_all_ranks_with_fsdp(tmp_path):
    from gloo_ranks import DIST_TINY, run_ranks, write_dataset

    overrides = DIST_TINY + [write_dataset(tmp_path / "images.npy"), "compute.fused_optimizer=true",
                             "train.batch_size_per_gpu=4"]
    results = run_ranks(_nan_step_on_rank, 2, tmp_path / "ranks", overrides, str(tmp_path / "run"))
    assert [r["skipped"] for r in results] == [1, 1]
    assert all(r["unchanged"] for r in results)
    assert [r["then"] for r in results] == [0, 0]
