"""Submit a DINOv2 pretraining job to SLURM, or run it here, through submitit.

    dinov2-submit --config train/vitl14.yaml --output-dir /shared/runs/vitl14 --nodes 4 --gpus-per-node 8 \
        --partition learn --time 4320 --setup "module load cuda/12.4" --slurm mail-type=END key=value ...
    dinov2-submit ... --dry-run        # print the sbatch script and the resolved config; submit nothing
    dinov2-submit --config train/demo_mnist.yaml --output-dir runs/local --gpus-per-node 2 --local

One task per GPU (``--nodes`` x ``--gpus-per-node`` ranks). Each task translates its submitit
environment into torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR...) and runs the ordinary
trainer with ``distributed.launcher=torchrun``. On preemption or time-out submitit calls
``TrainingJob.checkpoint()``, which requeues the same job; the requeued job resumes from the
newest complete checkpoint in the output directory (so at most ``checkpoint.every_n_steps``
steps are redone). ``--local`` runs the same job with submitit's local executor: ``--gpus-per-node``
processes on this machine (on CPU they form a gloo group), and streams rank 0's log here.

``--setup`` lines run in the job script before the tasks start (module loads, environment
activation); ``--slurm KEY[=VALUE]`` adds any other ``#SBATCH --KEY=VALUE`` line (it wins over the
option of the same name). Logs: ``OUTPUT_DIR/submitit/<job id>_<task>_log.{out,err}``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO

import submitit

from dinov2.configs import ConfigError, load_config
from dinov2.logging.console import setup_logging
from dinov2.train.build import ensure_writable_dir
from dinov2.train.run_plan import with_batch_size_per_gpu

logger = logging.getLogger("dinov2.cli.submit")

LOG_DIR = "submitit"  # one flat folder: no "%j" in the path, so submitit leaves no literal "%j/" folder behind


class TrainingJob(submitit.helpers.Checkpointable):
    """The callable submitit pickles and runs in every task; requeueable."""

    def __init__(self, config: str | None, output_dir: str, overrides: list[str], *, from_submitit: bool = True):
        self.config = config
        self.output_dir = output_dir
        self.overrides = list(overrides)
        # False runs the trainer with the config's own launcher (tests call the job in-process).
        self.from_submitit = from_submitit

    def __call__(self) -> dict:
        from dinov2.train.train import run  # imported in the task, not on the submitting node

        setup_logging(logging.INFO)
        overrides = list(self.overrides)
        if self.from_submitit:
            # MASTER_ADDR = first host of the job, MASTER_PORT from the job id, RANK/WORLD_SIZE/LOCAL_RANK
            # from the task; the GPU is picked from LOCAL_RANK by the trainer.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            overrides.append("distributed.launcher=torchrun")
        cfg = load_config(self.config, overrides)
        result, _ = run(cfg, self.output_dir, resume=True)
        return result

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Preempted or timed out: requeue this job unchanged; it resumes from the latest checkpoint
        (the trainer always resumes from the newest complete one in the output directory)."""
        logger.warning("job interrupted: requeueing; it will resume from the latest checkpoint in %s", self.output_dir)
        requeued = TrainingJob(self.config, self.output_dir, self.overrides, from_submitit=self.from_submitit)
        return submitit.helpers.DelayedSubmission(requeued)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dinov2-submit", description="Submit DINOv2 pretraining to SLURM (one task per GPU) or run it "
        "locally with --local, through submitit. Preempted or timed-out jobs requeue and resume.",
        epilog="Example: dinov2-submit --config train/vitl14.yaml --output-dir /shared/runs/x --nodes 2 "
        "--gpus-per-node 8 --partition learn --time 4320 --setup 'module load cuda/12.4' --slurm mail-type=END "
        "--dry-run optim.epochs=100",
    )
    parser.add_argument("--config", default=None, help="recipe YAML (a path, or relative to the packaged configs/)")
    parser.add_argument("--output-dir", required=True, help="run directory on a filesystem shared by all nodes")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node = tasks per node")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--qos", help="SLURM QOS")
    parser.add_argument("--time", type=int, default=2880, help="time limit per job, minutes (default 2880)")
    parser.add_argument("--constraint", help="SLURM node constraint, e.g. volta32gb")
    parser.add_argument("--exclude", help="nodes to avoid, e.g. node[01-03]")
    parser.add_argument("--comment", help="SLURM comment")
    parser.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (data loading workers)")
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node (default: the partition's)")
    parser.add_argument("--max-timeouts", type=int, default=20, help="requeues after a time-out (preemptions are not "
                        "counted)")
    parser.add_argument("--name", default="dinov2", help="job name")
    parser.add_argument("--setup", action="append", default=[], metavar="CMD",
                        help="a shell line run in the job before the tasks, e.g. 'module load cuda/12.4' (repeatable)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY[=VALUE]",
                        help="any other sbatch option, e.g. --slurm mail-type=END --slurm reservation=mine "
                        "--slurm exclusive (repeatable; wins over the option of the same name)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script and the resolved config, and submit nothing")
    parser.add_argument("--local", action="store_true",
                        help="run here with submitit's local executor (--gpus-per-node processes), stream rank 0's "
                        "log and wait for it")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return parser.parse_args(argv)


def slurm_options(pairs: list[str]) -> dict[str, str | bool]:
    """``["mail-type=END", "exclusive"]`` -> ``{"mail_type": "END", "exclusive": True}`` (sbatch spelling of
    each key: ``_`` and ``-`` alike; a leading ``--`` is dropped)."""
    options: dict[str, str | bool] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key or (sep and not value):
            raise ValueError(f"--slurm {pair!r}: expected KEY=VALUE (e.g. mail-type=END) or a bare flag KEY")
        options[key] = value if sep else True
    return options


def slurm_parameters(args: argparse.Namespace) -> dict:
    """Parameters of submitit's SlurmExecutor (its own names) for ``args``; the dry run prints what they give."""
    params = dict(
        job_name=args.name, nodes=args.nodes, ntasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, signal_delay_s=120,
    )
    params.update({key: value for key, value in dict(
        partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
        exclude=args.exclude, comment=args.comment).items() if value})
    extra = {"mem": f"{args.mem_gb}GB"} if args.mem_gb else {}
    extra.update(slurm_options(args.slurm))  # verbatim #SBATCH lines, written after (and over) the others
    if extra:
        params["additional_parameters"] = extra
    if args.setup:
        params["setup"] = list(args.setup)
    return params


def log_folder(output_dir: str | Path) -> Path:
    return Path(output_dir).resolve() / LOG_DIR


def sbatch_script(args: argparse.Namespace) -> str:
    """The sbatch script ``dinov2-submit`` would submit for ``args`` (submitit's own renderer)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = log_folder(args.output_dir)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(args))


def validate(args: argparse.Namespace):
    """Fail on the submitting machine, before anything is queued; return the resolved config."""
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {args.nodes} and {args.gpus_per_node}")
    if args.local and args.nodes != 1:
        raise ValueError("--local runs on this machine only: use --nodes 1")
    if args.local and args.slurm:
        raise ValueError("--slurm options are for SLURM jobs; --local runs here without SLURM")
    slurm_options(args.slurm)
    cfg = load_config(args.config, args.overrides)  # a typo in a key fails here, not in the queue
    with_batch_size_per_gpu(cfg, args.nodes * args.gpus_per_node)  # the trainer's rule, checked before queueing
    if not args.dry_run:
        ensure_writable_dir(args.output_dir)
    return cfg


def make_executor(args: argparse.Namespace) -> submitit.Executor:
    folder = log_folder(args.output_dir)
    if args.local:
        import torch

        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(name=args.name, timeout_min=args.time, tasks_per_node=args.gpus_per_node,
                                   gpus_per_node=args.gpus_per_node if torch.cuda.is_available() else 0,
                                   **({"local_setup": list(args.setup)} if args.setup else {}))
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_timeouts)
    executor.update_parameters(**slurm_parameters(args))
    return executor


def stream_log(job, out: TextIO = sys.stdout, err: TextIO = sys.stderr, poll_s: float = 0.5) -> None:
    """Copy rank 0's stdout and stderr to ``out`` / ``err`` as they grow, until the job is done."""
    offsets = {}
    while True:
        done = job.done()  # read before the last copy: nothing written before "done" is missed
        for path, stream in ((job.paths.stdout, out), (job.paths.stderr, err)):
            if not path.exists():
                continue
            with path.open("r", errors="replace", newline="") as f:
                f.seek(offsets.get(path, 0))
                text = f.read()
                offsets[path] = f.tell()
            if text:
                stream.write(text)
                stream.flush()
        if done:
            return
        time.sleep(poll_s)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(logging.INFO)
    try:
        cfg = validate(args)
        if args.dry_run:
            from omegaconf import OmegaConf

            if args.local:
                print(f"# --local: {args.gpus_per_node} process(es) on this machine with submitit's local executor"
                      + (f"; setup: {'; '.join(args.setup)}" if args.setup else ""))
            else:
                print(sbatch_script(args))
            print(f"# resolved config (the job loads --config {args.config} with {len(args.overrides)} override(s))")
            print(OmegaConf.to_yaml(cfg), end="")
            print("# dry run: nothing was submitted", file=sys.stderr)
            return 0
        args.output_dir = str(Path(args.output_dir).resolve())
        config = str(Path(args.config).resolve()) if args.config and Path(args.config).exists() else args.config
        executor = make_executor(args)
        job = executor.submit(TrainingJob(config, args.output_dir, args.overrides))
    except (ConfigError, ValueError, PermissionError, RuntimeError) as error:
        print(f"dinov2-submit: error: {error}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {args.gpus_per_node} task(s); logs "
          f"{job.paths.stdout.parent}/{job.job_id}_<task>_log.out/.err")
    if not args.local:
        return 0
    stream_log(job)
    try:
        result = job.results()[0]  # rank 0's; re-raises a task's exception with its traceback text
    except Exception as error:  # noqa: BLE001 - submitit wraps the task's exception
        print(f"dinov2-submit: the job failed: {error}", file=sys.stderr)
        return 1
    from dinov2.train.summary import run_summary

    print(run_summary(args.output_dir, cfg, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
