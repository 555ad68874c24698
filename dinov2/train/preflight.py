"""``dinov2-train --dry-run``: what a run would do, before it does it.

Images found, steps per epoch, total steps, passes over the data, the lr after batch scaling, the
parameter count, device and precision, the high-resolution phase (checked by the same ``plan_phases`` as
the real run: sizes multiple of the patch, steps within the run), and an ETA from a few timed training
steps, with warnings
for settings that waste a run (many passes over a tiny set, an epoch of fixed length far from one
pass, more prototypes than images, bf16/fp16 on a CPU).

Nothing is written into the run directory and its lock is not taken: the timed steps run in a
temporary directory, and an existing run there is only read (the step a resume would start from).
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dinov2.checkpoint import CheckpointManager
from dinov2.compute import intra_op_threads, resolve_device
from dinov2.train.build import build_dataset, build_train_loader
from dinov2.train.phases import Phase, plan_phases
from dinov2.train.run_plan import AUTO, RunPlan, plan_run, with_epoch_length

logger = logging.getLogger("dinov2.train")

MANY_PASSES = 1000  # more passes over the data than this: almost certainly not what was meant
EPOCH_PASSES = 10  # a fixed-length epoch covering more (or less than 1/this) of the data than this


@dataclass
class Preflight:
    plan: RunPlan
    dataset: str
    device: str
    precision: str
    world_size: int
    parameters: dict[str, int]  # module -> parameters (student side; the teacher is an EMA copy)
    resume_step: int = 0
    high_res: Phase | None = None  # the high-resolution phase (None: off) and its first step
    high_res_start: int = 0
    step_seconds: float | None = None  # median of the timed steps (data loading included)
    warnings: list[str] = field(default_factory=list)

    @property
    def eta_seconds(self) -> float | None:
        if self.step_seconds is None:
            return None
        return self.step_seconds * max(self.plan.total_steps - self.resume_step, 0)


def count_parameters(cfg) -> dict[str, int]:
    """Parameters of the student's modules, counted on the meta device (no memory, any size)."""
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    cfg = copy.deepcopy(cfg)
    cfg.student.pretrained_weights = ""  # only the shapes matter
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in model.student.items()}


def _resume_step(output_dir: Path) -> int:
    """The step a run in ``output_dir`` would resume from (read only; 0 when there is none)."""
    latest = CheckpointManager(output_dir / "checkpoints").latest() if output_dir.is_dir() else None
    return latest[0] if latest else 0


def plan_warnings(cfg, plan: RunPlan, device: torch.device) -> list[str]:
    """Settings that waste a run, in words."""
    warnings = []
    n = plan.num_images
    if plan.passes > MANY_PASSES:
        warnings.append(
            f"{plan.total_steps:,} steps x {plan.global_batch_size} images = {plan.passes:,.0f} passes over {n:,} "
            f"images: a run this long on so little data mostly repeats itself; use train.OFFICIAL_EPOCH_LENGTH=auto "
            f"and fewer optim.epochs (configs/train/small_rgb.yaml is a recipe for 100-10,000 images)")
    if cfg.train.OFFICIAL_EPOCH_LENGTH != AUTO and not 1 / EPOCH_PASSES <= plan.passes_per_epoch <= EPOCH_PASSES:
        warnings.append(
            f"an epoch is a fixed {plan.steps_per_epoch} steps (train.OFFICIAL_EPOCH_LENGTH) = "
            f"{plan.passes_per_epoch:.3g} passes over the {n:,} images; train.OFFICIAL_EPOCH_LENGTH=auto makes it one")
    if n < plan.global_batch_size:
        warnings.append(f"the global batch ({plan.global_batch_size}) is larger than the dataset ({n} images): "
                        f"every batch repeats images")
    if cfg.dino.head_n_prototypes > max(n, 1) * 10:
        warnings.append(f"dino.head_n_prototypes={cfg.dino.head_n_prototypes:,} for {n:,} images: a head this wide "
                        f"tends to stay uniform (teacher entropy at ln K) on small data; a few hundred is plenty")
    if device.type == "cpu" and cfg.compute.precision != "fp32":
        warnings.append(f"compute.precision={cfg.compute.precision} on a CPU: autocast there is slow or unsupported "
                        f"for many ops and gains no memory worth having; use compute.precision=fp32")
    if plan.warmup_steps >= plan.total_steps:
        warnings.append(f"the lr warmup ({plan.warmup_steps} steps) covers the whole run ({plan.total_steps} steps)")
    return warnings


def log_plan_warnings(cfg, num_images: int, world_size: int, device: torch.device) -> list[str]:
    """The dry run's warnings, logged when a real run starts (the cfg holds the resolved epoch length)."""
    warnings = plan_warnings(cfg, plan_run(cfg, num_images, world_size), device)
    for warning in warnings:
        logger.warning(warning)
    return warnings


def time_steps(cfg, steps: int, trainer_class) -> float:
    """Median seconds of ``steps`` training steps (after one untimed warm-up step), data loading included,
    run in a temporary directory by ``trainer_class`` (the real Trainer: the real step, not a model of it)."""

    cfg = copy.deepcopy(cfg)
    cfg.logging.tensorboard = False
    cfg.logging.progress_bar = False
    cfg.logging.collapse_warnings = False
    cfg.logging.plots = False
    cfg.evaluation.knn_every_n_steps = 0
    with tempfile.TemporaryDirectory(prefix="dinov2-dry-run-") as scratch:
        trainer = trainer_class(cfg, scratch, resume=False)
        try:
            loader = build_train_loader(cfg, trainer.dataset, start=0)
            batches = iter(loader)
            samples = []
            for index in range(steps + 1):
                started = time.perf_counter()
                trainer.train_step([next(batches) for _ in range(trainer.accum_steps)])
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize(trainer.device)
                if index:  # the first step pays for workers, kernels and allocations
                    samples.append(time.perf_counter() - started)
            del batches
        finally:
            trainer.close()
    return statistics.median(samples)


def preflight(cfg, output_dir: str | Path | None, *, timed_steps: int = 3, trainer_class=None) -> Preflight:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dataset = build_dataset(cfg.data.dataset, cfg.student.in_chans)
    plan = plan_run(cfg, len(dataset), world_size)
    # The real run's check (Trainer: plan_phases on the schedules' length), before anything is timed.
    phases = plan_phases(with_epoch_length(cfg, plan.num_images, plan.global_batch_size),
                         plan.epochs * plan.steps_per_epoch)
    device = resolve_device(cfg.compute.device)
    report = Preflight(
        plan=plan, dataset=cfg.data.dataset, device=str(device), precision=str(cfg.compute.precision),
        world_size=world_size, parameters=count_parameters(cfg),
        resume_step=_resume_step(Path(output_dir)) if output_dir else 0,
        warnings=plan_warnings(cfg, plan, device), high_res=phases.high_res, high_res_start=phases.switch_step,
    )
    if timed_steps > 0 and world_size == 1 and trainer_class is not None:
        with intra_op_threads(cfg.compute.num_threads):  # as dinov2-train runs
            report.step_seconds = time_steps(cfg, timed_steps, trainer_class)
    return report


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_preflight(report: Preflight, output_dir: str | Path | None) -> str:
    plan = report.plan
    params = report.parameters
    lines = [
        "dinov2-train --dry-run (nothing was written)",
        f"  data:             {report.dataset}: {plan.num_images:,} images",
        f"  global batch:     {plan.global_batch_size} images per step ({report.world_size} process(es))",
        f"  steps per epoch:  {plan.steps_per_epoch:,} ({plan.passes_per_epoch:.3g} passes over the data)",
        f"  total steps:      {plan.total_steps:,} = {plan.epochs} epochs"
        + (" (cut by train.max_steps)" if plan.total_steps < plan.epochs * plan.steps_per_epoch else ""),
        f"  passes over data: {plan.passes:,.1f}",
        f"  peak lr:          {plan.peak_lr:.3g} after batch scaling; warmup {plan.warmup_steps:,} steps",
        "  parameters:       " + ", ".join(f"{name} {count / 1e6:.2f} M" for name, count in params.items())
        + " (student; the EMA teacher is a copy)",
        f"  device:           {report.device}, precision {report.precision}",
    ]
    if report.high_res is not None:
        high = report.high_res
        lines.append(f"  high resolution:  steps {report.high_res_start:,}-{plan.epochs * plan.steps_per_epoch - 1:,}: "
                     f"global crops {high.global_crops_size} px, local {high.local_crops_size} px, "
                     f"batch {high.batch_size_per_gpu} per process")
    if output_dir:
        where = f"resumes at step {report.resume_step:,}" if report.resume_step else "starts at step 0"
        lines.append(f"  run directory:    {output_dir} ({where})")
    if report.step_seconds is not None:
        lines.append(f"  time:             {report.step_seconds:.3g} s per step (timed) -> ETA "
                     f"{_duration(report.eta_seconds)} for {plan.total_steps - report.resume_step:,} steps")
    lines += [f"WARNING: {warning}" for warning in report.warnings]
    return "\n".join(lines)


def preflight_cli(cfg, output_dir: str | Path | None, *, print_config: bool = False, dry_run: bool = True,
                  timed_steps: int = 3, trainer_class=None) -> int:
    """``--print-config`` and/or ``--dry-run``: print, return the exit status (0)."""
    if print_config:
        from dinov2.configs.reference import format_config

        print(format_config(cfg), flush=True)
    if dry_run:
        report = preflight(cfg, output_dir, timed_steps=timed_steps, trainer_class=trainer_class)
        print(format_preflight(report, output_dir), flush=True)
    return 0
