"""Per-step hyper-parameter schedules of the DINOv2 recipe, exactly the official ``CosineScheduler``.

The official scheduler (``dinov2/utils/utils.py``) is an array: ``np.linspace(start, base, W)`` over
the ``W`` warmup steps (endpoint included: ``base`` is reached at step ``W - 1``), then
``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` for the ``n = total - W`` remaining steps
(``i = 0`` gives ``base`` again), and ``final`` from step ``total`` on. The last-layer lr is the lr
schedule with its first ``freeze_last_layer_epochs`` epochs overwritten by 0; the teacher temperature
is a schedule whose warmup is its whole length. Here each schedule computes one step with the same
floating-point operations, a pure function of the step: resuming at step k needs nothing but k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dinov2.configs.choices import ScalingRule


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup ``start_warmup -> base`` (``np.linspace``), cosine ``base -> final``, then ``final``."""

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    start_warmup: float = 0.0
    zero_steps: int = 0  # the first steps are 0 (the official last-layer freeze overwrites them)

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]")
        if self.zero_steps < 0:
            raise ValueError(f"zero_steps must be >= 0, got {self.zero_steps}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"a schedule starts at step 0, got {step}")
        if step >= self.total_steps:
            return float(self.final)
        if step < self.zero_steps:
            return 0.0
        if step < self.warmup_steps:  # np.linspace(start_warmup, base, warmup_steps)[step]
            if self.warmup_steps == 1:
                return float(self.start_warmup)  # a one-point linspace is its start
            if step == self.warmup_steps - 1:
                return float(self.base)  # linspace sets its endpoint exactly
            delta = (self.base - self.start_warmup) / (self.warmup_steps - 1)
            return float(step * delta + self.start_warmup)
        cosine_steps = self.total_steps - self.warmup_steps
        i = step - self.warmup_steps
        return float(self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * i / cosine_steps)))


def scaled_learning_rate(base_lr: float, global_batch_size: int, rule: str) -> float:
    """The recipe's lr for a global batch: ``sqrt_wrt_1024`` (DINOv2), ``linear_wrt_256`` or ``none``."""
    if rule == ScalingRule.sqrt_wrt_1024:
        return base_lr * math.sqrt(global_batch_size / 1024.0)
    if rule == ScalingRule.linear_wrt_256:
        return base_lr * global_batch_size / 256.0
    if rule == ScalingRule.none:
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; choose one of {', '.join(ScalingRule.values())}")


@dataclass
class TrainingSchedules:
    """Every schedule the trainer reads each step."""

    lr: CosineSchedule
    last_layer_lr: CosineSchedule
    weight_decay: CosineSchedule
    teacher_momentum: CosineSchedule
    teacher_temp: CosineSchedule

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": self.lr(step),
            "last_layer_lr": self.last_layer_lr(step),
            "weight_decay": self.weight_decay(step),
            "teacher_momentum": self.teacher_momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }


def build_schedules(cfg, global_batch_size: int) -> TrainingSchedules:
    """The official ``build_schedulers``: epochs are ``train.OFFICIAL_EPOCH_LENGTH`` steps."""
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch
    lr = scaled_learning_rate(cfg.optim.base_lr, global_batch_size, cfg.optim.scaling_rule)
    lr_args = dict(base=lr, final=cfg.optim.min_lr, total_steps=total, warmup_steps=cfg.optim.warmup_epochs * epoch)
    temp_steps = cfg.teacher.warmup_teacher_temp_epochs * epoch
    return TrainingSchedules(
        lr=CosineSchedule(**lr_args),
        last_layer_lr=CosineSchedule(**lr_args, zero_steps=cfg.optim.freeze_last_layer_epochs * epoch),
        weight_decay=CosineSchedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        teacher_momentum=CosineSchedule(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        teacher_temp=CosineSchedule(
            cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, temp_steps, temp_steps, cfg.teacher.warmup_teacher_temp
        ),
    )
