"""``dinov2-train``: DINOv2 pretraining from a recipe and ``key=value`` overrides.

    dinov2-train --config train/vitl14.yaml --output-dir runs/x key=value ...
    torchrun --nproc-per-node 8 -m dinov2.cli.train --config ... --output-dir ...   (or dinov2-submit)

The command line only: the loop is ``dinov2.train.train.Trainer`` (``run`` joins the process group
around it). Bad input is one line on stderr and exit code 2; a stop signal exits 128 + signal after
a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dinov2.checkpoint import CheckpointSaveError
from dinov2.compute import DeviceError
from dinov2.configs import ConfigError, load_config
from dinov2.distributed import DistributedSetupError
from dinov2.logging.console import setup_logging
from dinov2.train.preflight import preflight_cli
from dinov2.train.run_dir import RunDirectoryBusyError
from dinov2.train.signals import TrainingInterrupted
from dinov2.train.summary import run_summary
from dinov2.train.train import NonFiniteLossError, Trainer, run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dinov2-train", description="DINOv2 self-supervised pretraining on one machine (see dinov2-submit to scale out).",
        epilog="Example: dinov2-train --config train/demo_mnist.yaml --output-dir runs/demo optim.epochs=5",
    )
    parser.add_argument("--config", default=None, help="recipe YAML (a path, or relative to the packaged configs/)")
    parser.add_argument("--output-dir", help="where config, metrics, checkpoints go (required to train)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start fresh; a run already in the output directory is moved to OUTPUT_DIR/previous_runs/")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key with its description, default and valid values) and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what the run would do (images, steps, passes, lr, parameters, device, ETA from a "
                        "few timed steps) and warnings, then exit; nothing is written to the output directory")
    parser.add_argument("--dry-run-steps", type=int, default=3, metavar="N",
                        help="training steps the dry run times for its ETA (default 3; 0 = no timing)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. optim.base_lr=1e-3)")
    args = parser.parse_args(argv)
    if args.output_dir is None and not (args.print_config or args.dry_run):
        parser.error("--output-dir is required to train (only --print-config and --dry-run do without it)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(logging.INFO)  # third-party INFO noise (the faiss loader) stays quiet
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config or args.dry_run:
            return preflight_cli(cfg, args.output_dir, print_config=args.print_config, dry_run=args.dry_run,
                                 timed_steps=args.dry_run_steps, trainer_class=Trainer)
        result, env = run(cfg, args.output_dir, resume=not args.no_resume)
    except TrainingInterrupted as stopped:
        print(f"dinov2-train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("dinov2-train: interrupted (a second Ctrl-C: no checkpoint written for the current step)", file=sys.stderr)
        return 130
    except (ConfigError, NonFiniteLossError, PermissionError, FileNotFoundError, ValueError, DistributedSetupError, DeviceError,
            RunDirectoryBusyError, CheckpointSaveError) as error:
        # CheckpointMismatchError, CheckpointReadError and MetricsFileError are ValueErrors
        print(f"dinov2-train: error: {error}", file=sys.stderr)
        return 2
    if env.is_main:
        print(run_summary(args.output_dir, cfg, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
