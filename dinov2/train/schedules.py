"""Per-step hyper-parameter schedules of the DINOv2 recipe, on fvcore's param schedulers.

All are pure functions of the step: resuming at step k needs nothing but k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fvcore.common.param_scheduler import (
    CompositeParamScheduler, ConstantParamScheduler, CosineParamScheduler, LinearParamScheduler, ParamScheduler,
)


class StepSchedule:
    """An fvcore schedule over ``total_steps``; after the end it stays at its final value."""

    def __init__(self, scheduler: ParamScheduler, total_steps: int, final_value: float) -> None:
        if total_steps < 1:
            raise ValueError(f"a schedule needs total_steps >= 1, got {total_steps}")
        self.scheduler, self.total_steps, self.final_value = scheduler, total_steps, final_value

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return self.final_value
        return float(self.scheduler(step / self.total_steps))


def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0, start_warmup: float = 0.0) -> StepSchedule:
    """Linear warmup ``start_warmup -> base`` over ``warmup_steps``, then cosine ``base -> final``."""
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]")
    cosine = CosineParamScheduler(base, final)
    if warmup_steps == 0:
        return StepSchedule(cosine, total_steps, final)
    if warmup_steps == total_steps:
        return StepSchedule(LinearParamScheduler(start_warmup, base), total_steps, base)
    fraction = warmup_steps / total_steps
    composite = CompositeParamScheduler(
        [LinearParamScheduler(start_warmup, base), cosine],
        lengths=[fraction, 1.0 - fraction],
        interval_scaling=["rescaled", "rescaled"],
    )
    return StepSchedule(composite, total_steps, final)


def warmup_then_constant(start: float, value: float, warmup_steps: int) -> StepSchedule:
    """Linear ``start -> value`` over ``warmup_steps``, then ``value`` (the teacher temperature)."""
    if warmup_steps == 0:
        return StepSchedule(ConstantParamScheduler(value), 1, value)
    return StepSchedule(LinearParamScheduler(start, value), warmup_steps, value)


def scaled_learning_rate(base_lr: float, global_batch_size: int, rule: str) -> float:
    """The recipe's lr for a global batch: ``sqrt_wrt_1024`` (DINOv2), ``linear_wrt_256`` or ``none``."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; choose sqrt_wrt_1024, linear_wrt_256 or none")


@dataclass
class TrainingSchedules:
    """Every schedule the trainer reads each step."""

    lr: StepSchedule
    last_layer_lr: StepSchedule
    weight_decay: StepSchedule
    teacher_momentum: StepSchedule
    teacher_temp: StepSchedule
    freeze_last_layer_steps: int

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": self.lr(step),
            "last_layer_lr": 0.0 if step < self.freeze_last_layer_steps else self.last_layer_lr(step),
            "weight_decay": self.weight_decay(step),
            "teacher_momentum": self.teacher_momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }


def build_schedules(cfg, global_batch_size: int) -> TrainingSchedules:
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch
    lr = scaled_learning_rate(cfg.optim.base_lr, global_batch_size, cfg.optim.scaling_rule)
    lr_schedule = warmup_cosine(lr, cfg.optim.min_lr, total, cfg.optim.warmup_epochs * epoch)
    return TrainingSchedules(
        lr=lr_schedule,
        last_layer_lr=lr_schedule,
        weight_decay=warmup_cosine(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        teacher_momentum=warmup_cosine(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        teacher_temp=warmup_then_constant(
            cfg.teacher.warmup_teacher_temp, cfg.teacher.teacher_temp, cfg.teacher.warmup_teacher_temp_epochs * epoch
        ),
        freeze_last_layer_steps=cfg.optim.freeze_last_layer_epochs * epoch,
    )
