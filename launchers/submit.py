"""Submit a DINOv2 pretraining job to SLURM, or run it here, through submitit.

    dinov2-submit --config train/vitl14.yaml --output-dir /shared/runs/vitl14 --nodes 4 --gpus-per-node 8 \
        --partition learn --time 4320 key=value ...
    dinov2-submit --config train/demo_mnist.yaml --output-dir runs/local --gpus-per-node 2 --local

One task per GPU (``--nodes`` x ``--gpus-per-node`` ranks). Each task translates its submitit
environment into torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR...) and runs the ordinary
trainer with ``distributed.launcher=torchrun``. On preemption or time-out submitit calls
``TrainingJob.checkpoint()``, which requeues the same job; the requeued job resumes from the
newest complete checkpoint in the output directory (so at most ``checkpoint.every_n_steps``
steps are redone). ``--local`` runs the same job with submitit's local executor: ``--gpus-per-node``
processes on this machine (on CPU they form a gloo group).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import submitit

from dinov2.configs import ConfigError, load_config
from dinov2.train.build import ensure_writable_dir

logger = logging.getLogger("launchers.submit")


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

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
        "--gpus-per-node 8 --partition learn --time 4320 optim.epochs=100",
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
    parser.add_argument("--local", action="store_true",
                        help="run here with submitit's local executor (--gpus-per-node processes) and wait for it")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    """Fail on the submitting machine, before anything is queued."""
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {args.nodes} and {args.gpus_per_node}")
    if args.local and args.nodes != 1:
        raise ValueError("--local runs on this machine only: use --nodes 1")
    cfg = load_config(args.config, args.overrides)  # a typo in a key fails here, not in the queue
    world_size = args.nodes * args.gpus_per_node
    total = cfg.train.global_batch_size
    if total is not None and total % (world_size * cfg.compute.grad_accum_steps):
        raise ValueError(f"train.global_batch_size={total} is not divisible by {world_size} GPUs x "
                         f"compute.grad_accum_steps={cfg.compute.grad_accum_steps}")
    ensure_writable_dir(args.output_dir)


def make_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    folder = Path(args.output_dir) / "submitit" / "%j"
    if args.local:
        import torch

        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(name=args.name, timeout_min=args.time, tasks_per_node=args.gpus_per_node,
                                   gpus_per_node=args.gpus_per_node if torch.cuda.is_available() else 0)
        return executor
    executor = submitit.AutoExecutor(folder=folder, slurm_max_num_timeout=args.max_timeouts)
    slurm = {f"slurm_{k}": v for k, v in dict(partition=args.partition, account=args.account, qos=args.qos,
                                                constraint=args.constraint, exclude=args.exclude,
                                                comment=args.comment).items() if v}
    executor.update_parameters(
        name=args.name, nodes=args.nodes, tasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, timeout_min=args.time, slurm_signal_delay_s=120,
        **({"mem_gb": args.mem_gb} if args.mem_gb else {}), **slurm,
    )
    return executor


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        validate(args)
        args.output_dir = str(Path(args.output_dir).resolve())
        config = str(Path(args.config).resolve()) if args.config and Path(args.config).exists() else args.config
        executor = make_executor(args)
        job = executor.submit(TrainingJob(config, args.output_dir, args.overrides))
    except (ConfigError, ValueError, PermissionError, RuntimeError) as error:
        print(f"dinov2-submit: error: {error}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {args.gpus_per_node} task(s); logs in "
          f"{Path(args.output_dir) / 'submitit' / str(job.job_id)}")
    if not args.local:
        return 0
    try:
        result = job.results()[0]  # rank 0's; re-raises a task's exception with its traceback text
    except Exception as error:  # noqa: BLE001 - submitit wraps the task's exception
        print(f"dinov2-submit: the job failed: {error}", file=sys.stderr)
        return 1
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
