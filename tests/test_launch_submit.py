"""dinov2-submit: argument checks, the requeue-on-preemption contract, and (slow) a real 2-task
job on submitit's local executor that is preempted with SIGUSR2, requeued and resumed."""

import os
import signal
import time
from pathlib import Path

import pytest
import submitit

from dinov2.logging import read_metrics
from dinov2.train.train import Trainer
from gloo_ranks import DIST_TINY, fork_process, write_dataset
from launchers.submit import TrainingJob, main, make_executor, parse_args

SINGLE = [x for x in DIST_TINY if not x.startswith("distributed.launcher")] + ["distributed.launcher=single"]


def _wait_for(path: Path, timeout: float, process=None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process is not None and not process.is_alive():
            raise AssertionError(f"the job exited (code {process.exitcode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


def _run_until_preempted(job: TrainingJob, marker: Path) -> None:
    # The job process is "preempted" (killed) right after its step-2 checkpoint is published.
    save = Trainer.save_checkpoint

    def save_then_wait(self):
        path = save(self)
        if self.step == 2:
            marker.touch()
            time.sleep(600)
        return path

    Trainer.save_checkpoint = save_then_wait
    job()


def test_preempted_job_requeues_itself_and_resumes_from_the_latest_checkpoint(tmp_path, caplog):
    overrides = SINGLE + [write_dataset(tmp_path / "images.npy"), "train.max_steps=3", "checkpoint.every_n_steps=1"]
    job = TrainingJob(None, str(tmp_path / "run"), overrides, from_submitit=False)
    marker = tmp_path / "preempted"
    process = fork_process(_run_until_preempted, job, marker)
    try:
        _wait_for(marker, 180, process)
    finally:
        process.kill()  # SIGKILL: nothing gets to clean up, as with a node lost to preemption
        process.join()

    # What submitit does on SIGUSR2 / time-out: ask the job for its requeued form, pickle it, run it later.
    requeued = job.checkpoint()
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert vars(requeued.function) == vars(job)
    requeued.dump(tmp_path / "requeued.pkl")
    with caplog.at_level("INFO", logger="dinov2"):
        result = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl").result()
    assert result["step"] == 3
    assert any("resumed from" in r.getMessage() and "at step 2" in r.getMessage() for r in caplog.records)

    # The preempted-and-resumed run equals an uninterrupted one (bitwise in one process).
    TrainingJob(None, str(tmp_path / "uninterrupted"), overrides, from_submitit=False)()
    losses = [(m["step"], m["total_loss"]) for m in read_metrics(tmp_path / "run")]
    assert losses == [(m["step"], m["total_loss"]) for m in read_metrics(tmp_path / "uninterrupted")]
    assert [s for s, _ in losses] == [1, 2, 3]


def test_cli_rejects_bad_input_before_queueing(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--local", "--nodes", "2", "--gpus-per-node", "2"]) == 2
    assert "--local runs on this machine only" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path), "--local", "--gpus-per-node", "2", "optim.base_rl=1"]) == 2
    assert "did you mean 'optim.base_lr'" in capsys.readouterr().err
    assert main(["--output-dir", str(tmp_path), "--gpus-per-node", "3", "train.global_batch_size=16"]) == 2
    assert "not divisible by 3 GPUs" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--output-dir", str(blocker / "run"), "--local", "--gpus-per-node", "1"]) == 2
    assert "not writable" in capsys.readouterr().err
    assert not (tmp_path / "submitit").exists()


def test_slurm_parameters_map_to_one_task_per_gpu(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"  # submitit's SLURM executor only checks that srun exists
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    args = parse_args(["--output-dir", str(tmp_path), "--nodes", "4", "--gpus-per-node", "8", "--partition", "learn",
                       "--account", "proj", "--qos", "high", "--time", "600", "--constraint", "h100",
                       "--exclude", "node[01-02]", "--comment", "dinov2 vitl"])
    executor = make_executor(args)
    assert executor.cluster == "slurm"
    sbatch = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=600", "--partition=learn",
                 "--account=proj", "--qos=high", "--constraint=h100", "--exclude='node[01-02]'", "--cpus-per-task=10",
                 "--signal=USR2@120"):
        assert f"#SBATCH {line}" in sbatch, line
    assert "dinov2 vitl" in sbatch


def _task_pids(job_id: str) -> list[int]:
    """The local executor's task processes of a job (the controller has no GLOBALID)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in environ and any(
                e.startswith(b"SUBMITIT_LOCAL_GLOBALID=") for e in environ):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_local_executor_runs_two_gloo_tasks_and_requeues_on_preemption(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [x for x in DIST_TINY if not x.startswith("distributed.launcher")] + [
        write_dataset(tmp_path / "images.npy"), "train.batch_size_per_gpu=4", "checkpoint.every_n_steps=2"]  # 8 steps
    executor = make_executor(parse_args(["--output-dir", str(run_dir), "--gpus-per-node", "2", "--local", "--time", "20"]))
    job = executor.submit(TrainingJob(None, str(run_dir), overrides))
    _wait_for(run_dir / "checkpoints" / "step_000000002" / ".metadata", 300)
    pids = _task_pids(str(job.job_id))
    assert len(pids) == 2, pids
    for pid in pids:  # what SLURM sends every task before preempting the job
        os.kill(pid, signal.SIGUSR2)
    result = job.results()[0]
    assert result["step"] == 8
    logs = "".join(p.read_text() for p in (run_dir / "submitit").rglob("*_0_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs
    assert "resumed from" in logs
    assert "rank 0/2" in logs and "mesh (2,)" in logs
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 9))
