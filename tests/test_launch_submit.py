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
from dinov2.cli.submit import TrainingJob, main, make_executor, parse_args, sbatch_script, stream_log

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
    assert "not divisible by world size 3" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--output-dir", str(blocker / "run"), "--local", "--gpus-per-node", "1"]) == 2
    assert "not writable" in capsys.readouterr().err
    assert not (tmp_path / "submitit").exists()


def _fake_srun(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"  # submitit's SLURM executor only checks that srun exists
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")


SLURM_ARGS = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "learn", "--account", "proj", "--qos", "high",
              "--time", "600", "--constraint", "h100", "--exclude", "node[01-02]", "--comment", "dinov2 vitl",
              "--mem-gb", "480", "--setup", "module load cuda/12.4", "--setup", "source ~/venv/bin/activate",
              "--slurm", "mail-type=END", "--slurm=--reservation=mine", "--slurm", "exclusive",
              "--slurm", "time=720"]


def test_slurm_parameters_map_to_one_task_per_gpu(tmp_path, monkeypatch):
    _fake_srun(tmp_path, monkeypatch)
    args = parse_args(["--output-dir", str(tmp_path), *SLURM_ARGS])
    executor = make_executor(args)
    sbatch = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=learn",
                 "--account=proj", "--qos=high", "--constraint=h100", "--exclude='node[01-02]'", "--cpus-per-task=10",
                 "--signal=USR2@120", "--mem=480GB", "--mail-type=END", "--reservation=mine", "--exclusive"):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert "#SBATCH --time=720\n" in sbatch and "--time=600" not in sbatch  # a pass-through option wins
    assert "dinov2 vitl" in sbatch
    setup = sbatch.index("# setup\nmodule load cuda/12.4\nsource ~/venv/bin/activate\n")
    assert setup < sbatch.index("srun ")  # the setup lines run before the tasks
    # The dry run prints exactly what would be submitted, and logs go to one folder (no "%j" in it).
    assert sbatch_script(args) == sbatch
    assert f"--output={tmp_path.resolve()}/submitit/%j_0_log.out" in sbatch


def test_dry_run_prints_the_script_and_config_and_submits_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"  # no srun on this machine: the dry run does not need one
    assert main(["--output-dir", str(run_dir), *SLURM_ARGS, "--dry-run", "optim.base_lr=0.001"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("#!/bin/bash\n") and "#SBATCH --nodes=4" in captured.out
    assert "module load cuda/12.4" in captured.out and "submitit.core._submit" in captured.out
    assert "base_lr: 0.001" in captured.out and "arch: vit_large" in captured.out
    assert "nothing was submitted" in captured.err
    assert not run_dir.exists()  # nothing created
    assert main(["--output-dir", str(run_dir), "--dry-run", "--slurm", "=x"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["--output-dir", str(run_dir), "--local", "--slurm", "mail-type=END"]) == 2
    assert "--slurm options are for SLURM jobs" in capsys.readouterr().err


def test_local_executor_leaves_no_stray_folder_and_streams_rank0_log(tmp_path):
    import io

    args = parse_args(["--output-dir", str(tmp_path / "run"), "--local", "--gpus-per-node", "1", "--time", "5"])
    executor = make_executor(args)
    # Any importable callable: print writes rank 0's stdout, the warning its stderr.
    job = executor.submit(exec, "import sys, warnings\nfor i in range(3): print('line', i, flush=True)\n"
                                "print('to stderr', file=sys.stderr)")
    out, err = io.StringIO(), io.StringIO()
    stream_log(job, out, err, poll_s=0.1)
    assert job.result() is None
    assert "line 0\nline 1\nline 2\n" in out.getvalue() and "to stderr" in err.getvalue()
    assert out.getvalue() == job.paths.stdout.read_text()  # everything, once
    folder = tmp_path / "run" / "submitit"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == []  # submitit used to leave "%j/" here
    assert job.paths.stdout.parent == folder.resolve()


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
    assert not [p for p in (run_dir / "submitit").iterdir() if p.is_dir()]  # no stray "%j/" folder
    assert "this job is preempted" in logs and "Requeued job" in logs
    assert "resumed from" in logs
    assert "rank 0/2" in logs and "mesh (2,)" in logs
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 9))
