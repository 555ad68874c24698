"""Collapse warnings from the monitors the objective logs every step (see ssl_meta_arch.py).

Three ways a DINO run fails without an error, each visible in one monitor (README, "Is it learning?"):

* uniform collapse: every teacher output is the uniform distribution over the K prototypes, so
  ``teacher_entropy`` (mean per-sample entropy, nats) sits at its maximum ln K. Healthy: clearly
  below ln K once the warmup is over (a confident teacher puts its mass on a few prototypes).
* one prototype: every image goes to the same prototype, so ``teacher_batch_entropy`` (entropy of
  the batch-mean distribution) falls to 0. Healthy: well above 0 (ln 2B when the 2B global crops of
  a batch pick different prototypes).
* dead features: the student's L2-normalised class tokens are all the same vector, so
  ``student_feature_std`` (per-dimension std over the batch) falls to 0. Healthy: of the order of
  1/sqrt(D) for D-dimensional features spread over the sphere.

:func:`collapse_problems` is the pure rule; :class:`CollapseWatch` applies it at logging steps after
the lr warmup and logs a warning when a problem appears, every ``repeat_every`` steps while it
lasts, and once when it is gone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

logger = logging.getLogger("dinov2.train")

# Thresholds (README documents the healthy ranges they guard).
UNIFORM_FRACTION = 0.98  # teacher_entropy >= 98 % of ln K: the teacher says nothing
ONE_PROTOTYPE_NATS = 0.1  # teacher_batch_entropy below this: (almost) one prototype for the whole batch
DEAD_STD_FRACTION = 0.05  # student_feature_std below 5 % of 1/sqrt(D): (almost) one feature vector


@dataclass(frozen=True)
class Problem:
    kind: str  # uniform | one_prototype | dead_features
    message: str


def collapse_problems(metrics: dict, n_prototypes: int, embed_dim: int) -> list[Problem]:
    """What the logged monitors say is collapsed (nothing for monitors that were not logged)."""
    problems = []
    ln_k = math.log(n_prototypes)
    entropy = metrics.get("teacher_entropy")
    if entropy is not None and n_prototypes > 1 and entropy >= UNIFORM_FRACTION * ln_k:
        problems.append(Problem("uniform", (
            f"teacher entropy {entropy:.3f} is at ln K = {ln_k:.3f} (K = {n_prototypes} prototypes): the teacher's "
            f"outputs are uniform (uniform collapse); try a lower teacher.teacher_temp, fewer dino.head_n_prototypes, "
            f"a larger student.layerscale or optim.base_lr (configs/train/small_rgb.yaml is a recipe that learns)")))
    batch_entropy = metrics.get("teacher_batch_entropy")
    if batch_entropy is not None and batch_entropy < ONE_PROTOTYPE_NATS:
        problems.append(Problem("one_prototype", (
            f"teacher batch entropy {batch_entropy:.3f} is near 0: every image goes to the same prototype "
            f"(collapse to one prototype); try train.centering=sinkhorn_knopp, a higher teacher.teacher_temp or "
            f"a smaller teacher.momentum_teacher")))
    std = metrics.get("student_feature_std")
    spread = 1.0 / math.sqrt(embed_dim)
    if std is not None and std < DEAD_STD_FRACTION * spread:
        problems.append(Problem("dead_features", (
            f"student feature std {std:.2g} is near 0 (spread-out features give about 1/sqrt(D) = {spread:.2g}): "
            f"every image has the same features (collapse); try a higher dino.koleo_loss_weight, a lower "
            f"optim.base_lr or a longer optim.warmup_epochs")))
    return problems


@dataclass
class CollapseWatch:
    """Logs collapse warnings at logging steps after ``grace_steps`` (the lr warmup)."""

    n_prototypes: int
    embed_dim: int
    grace_steps: int = 0
    repeat_every: int = 100
    _warned: dict = field(default_factory=dict)  # kind -> step of the last warning

    def check(self, step: int, metrics: dict) -> list[Problem]:
        """Warn about what is collapsed at ``step``; return the current problems (warned or not)."""
        if step <= self.grace_steps:
            return []
        problems = collapse_problems(metrics, self.n_prototypes, self.embed_dim)
        current = {problem.kind for problem in problems}
        for problem in problems:
            last = self._warned.get(problem.kind)
            if last is None or step - last >= self.repeat_every:
                logger.warning("step %d: %s", step, problem.message)
                self._warned[problem.kind] = step
        for kind in [kind for kind in self._warned if kind not in current]:
            logger.info("step %d: the %s collapse warning no longer applies", step, kind.replace("_", " "))
            del self._warned[kind]
        return problems

    @classmethod
    def for_run(cls, cfg, embed_dim: int, warmup_steps: int, repeat_every: int | None = None) -> "CollapseWatch":
        every = repeat_every or max(100, 20 * cfg.logging.every_n_steps)
        return cls(cfg.dino.head_n_prototypes, embed_dim, grace_steps=warmup_steps, repeat_every=every)
