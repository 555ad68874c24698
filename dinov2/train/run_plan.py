"""How long a run is, in numbers: steps per epoch, total steps, passes over the data, the lr after scaling.

Pure functions of the config, the number of training images and the world size; the trainer and
``dinov2-train --dry-run`` both read them, so what the dry run prints is what the run does.

``train.OFFICIAL_EPOCH_LENGTH: auto`` makes an epoch one pass over the data,
``ceil(images / global batch)`` steps; an integer keeps the official meaning (a fixed number of
steps, 1250 in the released recipes, whatever the data size).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from dinov2.configs import ConfigError
from dinov2.train.schedules import scaled_learning_rate

AUTO = "auto"


def steps_per_epoch(setting: int | str, num_images: int, global_batch_size: int) -> int:
    """``setting`` steps, or for ``auto`` the steps of one pass over ``num_images`` (at least 1)."""
    if setting != AUTO:
        return int(setting)
    if num_images < 1:
        raise ValueError("train.OFFICIAL_EPOCH_LENGTH=auto needs a dataset with at least one image")
    return max(1, math.ceil(num_images / global_batch_size))


def global_batch_size(cfg, world_size: int = 1) -> int:
    """Images per optimizer step over all processes (``train.global_batch_size`` when set)."""
    if cfg.train.global_batch_size is not None:
        return int(cfg.train.global_batch_size)
    return cfg.train.batch_size_per_gpu * world_size * cfg.compute.grad_accum_steps


def with_batch_size_per_gpu(cfg, world_size: int):
    """``cfg`` with ``train.batch_size_per_gpu`` derived from ``train.global_batch_size`` when that is set."""
    total = cfg.train.global_batch_size
    if total is None:
        return cfg
    per_step = world_size * cfg.compute.grad_accum_steps
    if total % per_step:
        raise ConfigError(
            f"train.global_batch_size={total} is not divisible by world size {world_size} x "
            f"compute.grad_accum_steps={cfg.compute.grad_accum_steps}; pick a multiple of {per_step}"
        )
    cfg = copy.deepcopy(cfg)  # DictConfig.copy() is shallow: the caller's cfg.train would change too
    cfg.train.batch_size_per_gpu = total // per_step
    return cfg


def with_epoch_length(cfg, num_images: int, global_batch: int):
    """``cfg`` with ``train.OFFICIAL_EPOCH_LENGTH`` an integer (``auto`` resolved; else ``cfg`` itself)."""
    if cfg.train.OFFICIAL_EPOCH_LENGTH != AUTO:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.train.OFFICIAL_EPOCH_LENGTH = steps_per_epoch(AUTO, num_images, global_batch)
    return cfg


@dataclass(frozen=True)
class RunPlan:
    num_images: int
    global_batch_size: int
    steps_per_epoch: int
    epochs: int
    total_steps: int  # optim.epochs x steps_per_epoch, or train.max_steps when smaller
    peak_lr: float  # optim.base_lr after the batch-size scaling rule
    warmup_steps: int

    @property
    def passes(self) -> float:
        """How many times the run sees each image (on average)."""
        return self.total_steps * self.global_batch_size / max(self.num_images, 1)

    @property
    def passes_per_epoch(self) -> float:
        return self.steps_per_epoch * self.global_batch_size / max(self.num_images, 1)


def plan_run(cfg, num_images: int, world_size: int = 1) -> RunPlan:
    batch = global_batch_size(cfg, world_size)
    epoch = steps_per_epoch(cfg.train.OFFICIAL_EPOCH_LENGTH, num_images, batch)
    total = cfg.optim.epochs * epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    return RunPlan(
        num_images=num_images, global_batch_size=batch, steps_per_epoch=epoch, epochs=cfg.optim.epochs,
        total_steps=total, peak_lr=scaled_learning_rate(cfg.optim.base_lr, batch, cfg.optim.scaling_rule),
        warmup_steps=min(cfg.optim.warmup_epochs * epoch, total),
    )
