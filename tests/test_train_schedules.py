"""Schedules equal the official DINOv2 ``CosineScheduler`` (dinov2/utils/utils.py) step by step.

The reference below is that definition written out with numpy (an array per schedule, as the
official code builds it); our schedules compute one step at a time and must give the same values.
"""

import math

import numpy as np
import pytest

from dinov2.configs import load_config
from dinov2.train.schedules import CosineSchedule, build_schedules, scaled_learning_rate


def official_cosine(base, final, total, warmup=0, start=0.0):
    """The official CosineScheduler's array (freeze_iters=0, as every official schedule uses it)."""
    warmup_part = np.linspace(start, base, warmup)
    iters = np.arange(total - warmup)
    cosine_part = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_part, cosine_part))


def official_at(schedule: np.ndarray, final: float, step: int) -> float:
    return final if step >= len(schedule) else float(schedule[step])


def test_warmup_reaches_base_at_step_w_minus_1_by_hand():
    # W=3, total=7, 0 -> 1 -> 0: linspace(0, 1, 3) = 0, 0.5, 1; then cosine over n=4 steps from 1 to 0.
    schedule = CosineSchedule(base=1.0, final=0.0, total_steps=7, warmup_steps=3, start_warmup=0.0)
    c = math.cos(math.pi / 4)
    expected = [0.0, 0.5, 1.0, 1.0, 0.5 * (1 + c), 0.5, 0.5 * (1 - c), 0.0, 0.0]
    assert [schedule(s) for s in range(9)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert schedule(2) == 1.0  # exactly base at W-1 (one step later before the fix: 2/3 here)


def test_teacher_temperature_warmup_by_hand():
    # The official teacher-temp schedule: warmup over its whole length, linspace(0.04, 0.07, 4).
    schedule = CosineSchedule(0.07, 0.07, total_steps=4, warmup_steps=4, start_warmup=0.04)
    assert [schedule(s) for s in range(6)] == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07], rel=1e-12)
    assert schedule(3) == 0.07


def test_single_warmup_step_is_the_start_value():
    # np.linspace(start, base, 1) == [start]: base only comes with the cosine, at step 1.
    schedule = CosineSchedule(2.0, 0.0, total_steps=3, warmup_steps=1, start_warmup=0.5)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.5, 2.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "base, final, total, warmup, start",
    [(1.0, 0.1, 110, 10, 0.0), (0.992, 1.0, 37, 0, 0.0), (0.004, 1e-6, 50, 7, 0.0), (0.07, 0.07, 9, 9, 0.04),
     (3.0, 3.0, 5, 2, 3.0), (0.5, 0.25, 4, 4, 0.1), (1.0, 0.0, 1, 0, 0.0), (1.0, 0.0, 1, 1, 0.2), (1.0, 0.0, 0, 0, 0.0)],
)
def test_matches_the_official_array_at_every_step(base, final, total, warmup, start):
    reference = official_cosine(base, final, total, warmup, start)
    schedule = CosineSchedule(base, final, total, warmup, start)
    for step in range(total + 3):
        assert schedule(step) == pytest.approx(official_at(reference, final, step), rel=1e-12, abs=1e-15), step
    for step in range(warmup):  # the warmup is bitwise np.linspace
        assert schedule(step) == reference[step]


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="warmup_steps=5"):
        CosineSchedule(1.0, 0.0, total_steps=4, warmup_steps=5)
    with pytest.raises(ValueError, match="step 0"):
        CosineSchedule(1.0, 0.0, total_steps=4)(-1)


@pytest.mark.parametrize("rule, expected", [("sqrt_wrt_1024", 0.004 * 0.5), ("linear_wrt_256", 0.004), ("none", 0.004)])
def test_lr_scaling_rules(rule, expected):
    assert scaled_learning_rate(0.004, 256, rule) == pytest.approx(expected)


@pytest.mark.parametrize("freeze_epochs", [0, 1, 3])
def test_recipe_schedules_equal_official_build_schedulers(freeze_epochs):
    epoch, epochs, warmup_epochs, temp_epochs = 10, 20, 2, 3
    cfg = load_config(None, [f"train.OFFICIAL_EPOCH_LENGTH={epoch}", f"optim.epochs={epochs}",
                             f"optim.warmup_epochs={warmup_epochs}", f"optim.freeze_last_layer_epochs={freeze_epochs}",
                             f"teacher.warmup_teacher_temp_epochs={temp_epochs}"])
    at = build_schedules(cfg, global_batch_size=4096).at
    total, lr = epochs * epoch, 0.004 * 2.0  # sqrt(4096 / 1024) = 2
    # The official build_schedulers (dinov2/train/train.py), written out:
    lr_ref = official_cosine(lr, 1e-6, total, warmup_epochs * epoch, 0.0)
    last_layer_ref = lr_ref.copy()
    last_layer_ref[: freeze_epochs * epoch] = 0
    wd_ref = official_cosine(0.04, 0.4, total)
    momentum_ref = official_cosine(0.992, 1.0, total)
    temp_ref = official_cosine(0.07, 0.07, temp_epochs * epoch, temp_epochs * epoch, 0.04)
    for step in range(total + 2):
        values = at(step)
        expected = {
            "lr": official_at(lr_ref, 1e-6, step),
            "last_layer_lr": official_at(last_layer_ref, 1e-6, step),
            "weight_decay": official_at(wd_ref, 0.4, step),
            "teacher_momentum": official_at(momentum_ref, 1.0, step),
            "teacher_temp": official_at(temp_ref, 0.07, step),
        }
        assert values == pytest.approx(expected, rel=1e-12, abs=1e-15), step
    assert at(warmup_epochs * epoch - 1)["lr"] == lr and at(temp_epochs * epoch - 1)["teacher_temp"] == 0.07
