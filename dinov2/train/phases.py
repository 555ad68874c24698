"""The recipe's phases: the main phase, then the last ``high_res.steps`` steps at a higher resolution.

DINOv2 trains "at a higher resolution in the end for a short while" (the released models: the last
10k of 625k iterations at 518 px; the paper's ablation: 224 -> 416 for the last 10k iterations nearly
matches training at 416 throughout). Here the phase is part of the same run:

* it starts at step ``switch = optim.epochs * train.OFFICIAL_EPOCH_LENGTH - high_res.steps`` (the end of
  the schedules, not ``train.max_steps``: a run stopped early and resumed switches at the same step);
* from that step on the data loader is rebuilt with the phase's crop sizes and batch size, at the exact
  stream position the previous loader reached: crops, iBOT masks (the mask grid and its token count
  follow the global crop size) and the data order stay pure functions of (seed, position), so a resume
  inside the phase, or right at the switch, reproduces the uninterrupted run bitwise;
* the model is unchanged: the position embeddings stay on the main phase's grid and are resampled to the
  new crop sizes in every forward (as the released models do for any image size), and the packed student
  pass takes whatever token counts the crops have;
* the schedules continue by step. The paper describes the phase as the final iterations of the one run
  (Sec. 4 and Fig. 5 of Oquab et al., 2023): lr in the tail of its cosine (close to ``min_lr``), weight
  decay at its end value, teacher momentum close to 1 on its cosine, teacher temperature at its final
  value. The lr is not rescaled for the phase's batch size (it is near ``min_lr`` there). A short run
  whose teacher momentum is already ~1 in the last steps barely moves the teacher: run the adaptation as
  its own job instead (``train.init_from``, DINOv3-style, with schedules of its own).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from dinov2.configs import ConfigError


@dataclass(frozen=True)
class Phase:
    """What a step trains on."""

    name: str  # "main" or "high_res"
    global_crops_size: int
    local_crops_size: int
    batch_size_per_gpu: int

    def log_values(self) -> dict[str, int]:
        """The crop sizes and batch size in effect, for the per-step metrics."""
        return {"global_crops_size": self.global_crops_size, "local_crops_size": self.local_crops_size,
                "batch_size_per_gpu": self.batch_size_per_gpu, "high_res_phase": int(self.name == "high_res")}


@dataclass(frozen=True)
class PhasePlan:
    main: Phase
    high_res: Phase | None
    switch_step: int  # the first high-resolution step (== scheduled_steps when there is none)

    def at(self, step: int) -> Phase:
        return self.high_res if self.high_res is not None and step >= self.switch_step else self.main

    def config_for(self, cfg, phase: Phase):
        """``cfg`` with the phase's crop sizes and batch size (what the data loader is built from)."""
        if phase == self.main:
            return cfg
        cfg = copy.deepcopy(cfg)
        cfg.crops.global_crops_size = phase.global_crops_size
        cfg.crops.local_crops_size = phase.local_crops_size
        cfg.train.batch_size_per_gpu = phase.batch_size_per_gpu
        return cfg


def _check_multiple(key: str, size: int, patch: int) -> None:
    if size % patch:
        lower, upper = size // patch * patch, (size // patch + 1) * patch
        suggestion = f"{lower} or {upper}" if lower else str(upper)
        raise ConfigError(f"{key}={size} is not a multiple of student.patch_size={patch}; use e.g. {suggestion}")


def plan_phases(cfg, scheduled_steps: int) -> PhasePlan:
    """The run's phases; a clear :class:`ConfigError` for a phase that cannot run (checked before training).
    ``scheduled_steps``: ``optim.epochs * train.OFFICIAL_EPOCH_LENGTH`` (the length the schedules span)."""
    main = Phase("main", cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.train.batch_size_per_gpu)
    high = cfg.high_res
    if high.steps == 0:
        return PhasePlan(main, None, scheduled_steps)
    if high.steps > scheduled_steps:
        raise ConfigError(
            f"high_res.steps={high.steps} is larger than the run: optim.epochs={cfg.optim.epochs} x "
            f"train.OFFICIAL_EPOCH_LENGTH={cfg.train.OFFICIAL_EPOCH_LENGTH} = {scheduled_steps} steps; the phase is "
            f"the last high_res.steps of the run (DINOv2: 10k of 625k)"
        )
    patch = cfg.student.patch_size
    local = high.local_crops_size if high.local_crops_size is not None else cfg.crops.local_crops_size
    _check_multiple("high_res.global_crops_size", high.global_crops_size, patch)
    if cfg.crops.local_crops_number > 0:
        _check_multiple("high_res.local_crops_size" if high.local_crops_size is not None
                        else "crops.local_crops_size (used by the high-resolution phase)", local, patch)
    batch = high.batch_size_per_gpu if high.batch_size_per_gpu is not None else cfg.train.batch_size_per_gpu
    return PhasePlan(main, Phase("high_res", high.global_crops_size, local, batch), scheduled_steps - high.steps)


class PhasedBatches:
    """The batch of each step from the loader of that step's phase.

    ``build(cfg, start)`` makes a loader (``build_train_loader``) whose ``position`` is the global stream
    position of its next batch; when a step falls in another phase than the loader's, a new loader is
    built at that position (the old one, and its workers, are dropped). ``skipped_files`` is the one set
    every loader adds the unreadable files it meets to.
    """

    def __init__(self, plan: PhasePlan, cfg, build: Callable, *, start: int, skipped_files: set[int]) -> None:
        self.plan, self.cfg, self.build = plan, cfg, build
        self.skipped_files = skipped_files
        self._position = start
        self._phase: Phase | None = None
        self._loader = self._batches = None

    @property
    def position(self) -> int:
        return self._loader.position if self._loader is not None else self._position

    def next(self, step: int):
        phase = self.plan.at(step)
        if phase != self._phase:
            self.close()
            self._loader = self.build(self.plan.config_for(self.cfg, phase), self._position)
            self._loader.skipped_files = self.skipped_files
            self._batches = iter(self._loader)
            self._phase = phase
        return next(self._batches)

    def close(self) -> None:
        if self._loader is not None:
            self._position = self._loader.position
        self._batches = self._loader = None  # persistent workers shut down with their iterator
