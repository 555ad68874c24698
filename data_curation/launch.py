"""Run one job per shard index: a SLURM job array or local processes, both through submitit.

``launcher="slurm"``: one array task per shard (``#SBATCH --array=0-N%P``), each with its own
GPU(s); a task that is preempted or times out is requeued and resumes (the jobs are resumable
stages). ``launcher="local"``: one process per shard on this machine (submitit's local executor);
on a machine with several GPUs shard i uses GPU ``i mod #GPUs``; on CPU the cores are shared out.
Logs go to ``FOLDER/<job id>_<task>_log.{out,err}``. A failed shard is reported by index with its
log, after every other shard has finished (their outputs stay and are reused by a rerun).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .arrays import CurationInputError
from .choices import ShardLauncher, choose


@dataclass(frozen=True)
class LaunchOptions:
    launcher: ShardLauncher = ShardLauncher.local
    folder: str | None = None  # submitit logs and pickles; default OUTPUT_DIR/submitit
    parallelism: int | None = None  # at most this many shards at once (default: all)
    timeout_min: int = 24 * 60
    partition: str | None = None  # slurm
    gpus_per_job: int = 1  # slurm; local jobs see every GPU of the machine and pick one
    cpus_per_job: int = 8  # slurm
    slurm: Sequence[str] = field(default_factory=tuple)  # extra #SBATCH KEY=VALUE
    setup: Sequence[str] = field(default_factory=tuple)  # shell lines before each job (module load ...)
    wait: bool = True  # False: submit and return the jobs (slurm)

    def validate(self) -> None:
        choose(ShardLauncher, self.launcher, "launcher")
        if self.parallelism is not None and self.parallelism < 1:
            raise CurationInputError(f"parallelism must be >= 1, got {self.parallelism}")
        if self.timeout_min < 1 or self.gpus_per_job < 0 or self.cpus_per_job < 1:
            raise CurationInputError(
                f"need timeout_min >= 1, gpus_per_job >= 0, cpus_per_job >= 1; got {self.timeout_min}, "
                f"{self.gpus_per_job}, {self.cpus_per_job}")
        if self.launcher == ShardLauncher.local and not self.wait:
            raise CurationInputError("local jobs end with this process: --no-wait is for --launcher slurm")
        self.slurm_extras()

    def slurm_extras(self) -> dict:
        from dinov2.cli.submit import slurm_options  # the project's one parser of --slurm KEY=VALUE

        try:
            return slurm_options(list(self.slurm))
        except ValueError as exc:
            raise CurationInputError(str(exc)) from None

    def threads_per_job(self, count: int) -> int | None:
        """CPU threads each local job may use (the machine's cores shared out); None on SLURM."""
        if self.launcher != ShardLauncher.local:
            return None
        return max(1, (os.cpu_count() or 1) // min(count, self.parallelism or count))

    def slurm_parameters(self, name: str) -> dict:
        """Parameters of submitit's SlurmExecutor (its own names)."""
        params = dict(job_name=name, nodes=1, ntasks_per_node=1, gpus_per_node=self.gpus_per_job,
                      cpus_per_task=self.cpus_per_job, time=self.timeout_min, signal_delay_s=120)
        if self.partition:
            params["partition"] = self.partition
        if self.parallelism:
            params["array_parallelism"] = self.parallelism
        if self.slurm_extras():
            params["additional_parameters"] = self.slurm_extras()
        if self.setup:
            params["setup"] = list(self.setup)
        return params


def sbatch_script(options: LaunchOptions, count: int, folder: str | Path, name: str) -> str:
    """The sbatch script of a job array of ``count`` tasks (submitit's own renderer), for --dry-run."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).resolve()
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=count, **options.slurm_parameters(name))


def make_executor(options: LaunchOptions, folder: str | Path, name: str):
    import submitit

    if options.launcher == ShardLauncher.local:
        import torch

        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=options.timeout_min, gpus_per_node=torch.cuda.device_count(),
                                   **({"setup": list(options.setup)} if options.setup else {}))
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
    executor.update_parameters(**options.slurm_parameters(name))
    return executor


class ShardJobsFailed(RuntimeError):
    """Some shard jobs failed; ``failed`` maps shard index -> (error, log file)."""

    def __init__(self, name: str, failed: dict[int, tuple[str, str]]):
        self.failed = failed
        lines = [f"{name}: {len(failed)} shard job(s) failed: {sorted(failed)}"]
        lines += [f"  shard {index}: {error} (log: {log})" for index, (error, log) in sorted(failed.items())]
        lines.append("  the finished shards are kept: rerun the same command to redo only the failed ones")
        super().__init__("\n".join(lines))


def run_array(job: Callable[[int], object], indices: Sequence[int], options: LaunchOptions, folder: str | Path,
              name: str) -> list:
    """``job(i)`` for every shard index, one process / array task each. Waits and returns the
    results in order (or, with ``wait=False``, the submitted submitit jobs)."""
    import submitit

    options.validate()
    indices = list(indices)
    if not indices:
        return []
    executor = make_executor(options, folder, name)
    waves = [indices]
    if options.launcher == ShardLauncher.local and options.parallelism:  # slurm throttles with --array=...%P itself
        waves = [indices[i : i + options.parallelism] for i in range(0, len(indices), options.parallelism)]
    results, failed = {}, {}
    for wave in waves:
        jobs = executor.map_array(job, wave)
        if not options.wait:
            return jobs
        for index, submitted in zip(wave, jobs):
            try:
                results[index] = submitted.result()
            except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
                failed[index] = (_error_line(str(exc)), str(submitted.paths.stderr))
    if failed:
        raise ShardJobsFailed(name, failed)
    return [results[i] for i in indices]


def _error_line(report: str) -> str:
    """The exception line ("CurationInputError: ...") of a failed job's traceback, as submitit
    reports it between two dashed lines; the report's first line when there is none."""
    lines = [line.rstrip() for line in report.splitlines() if line.strip()]
    dashes = [i for i, line in enumerate(lines) if set(line.strip()) == {"-"}]
    if len(dashes) >= 2 and dashes[1] > dashes[0] + 1:
        return lines[dashes[1] - 1].strip()
    return lines[0].strip() if lines else "failed"


def set_threads(threads: int | None) -> None:
    """Limit torch (when loaded: a dedup job never imports it) and FAISS (OpenMP) to ``threads``
    in this process (local shard jobs)."""
    if not threads:
        return
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:  # pragma: no cover - faiss is a dependency
        pass
