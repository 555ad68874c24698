"""Schedules at their endpoints and in between, from the recipe's definitions."""

import math

import pytest

from dinov2.configs import load_config
from dinov2.train.schedules import build_schedules, scaled_learning_rate, warmup_cosine, warmup_then_constant


def test_warmup_then_cosine_endpoints_and_midpoint():
    schedule = warmup_cosine(base=1.0, final=0.1, total_steps=110, warmup_steps=10, start_warmup=0.0)
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    # Half-way through the cosine part: (base + final) / 2.
    assert schedule(60) == pytest.approx(0.55)
    assert schedule(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))
    assert schedule(110) == 0.1 and schedule(10_000) == 0.1


def test_cosine_without_warmup_is_monotonic():
    schedule = warmup_cosine(0.992, 1.0, 100)
    values = [schedule(s) for s in range(101)]
    assert values[0] == pytest.approx(0.992) and values[-1] == 1.0
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_teacher_temperature_warmup_then_constant():
    schedule = warmup_then_constant(0.04, 0.07, warmup_steps=30)
    assert schedule(0) == pytest.approx(0.04)
    assert schedule(15) == pytest.approx(0.055)
    assert schedule(30) == schedule(1000) == 0.07


@pytest.mark.parametrize("rule, expected", [("sqrt_wrt_1024", 0.004 * 0.5), ("linear_wrt_256", 0.004), ("none", 0.004)])
def test_lr_scaling_rules(rule, expected):
    assert scaled_learning_rate(0.004, 256, rule) == pytest.approx(expected)


def test_recipe_schedules_and_last_layer_freeze():
    cfg = load_config(None, ["train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=20", "optim.warmup_epochs=2",
                             "optim.freeze_last_layer_epochs=1", "teacher.warmup_teacher_temp_epochs=3"])
    schedules = build_schedules(cfg, global_batch_size=1024)
    at = schedules.at
    assert at(0)["lr"] == 0.0 and at(20)["lr"] == pytest.approx(0.004)
    assert at(5)["last_layer_lr"] == 0.0 and at(10)["last_layer_lr"] == pytest.approx(at(10)["lr"])
    assert at(0)["weight_decay"] == pytest.approx(0.04) and at(200)["weight_decay"] == pytest.approx(0.4)
    assert at(0)["teacher_momentum"] == pytest.approx(0.992) and at(200)["teacher_momentum"] == 1.0
    assert at(0)["teacher_temp"] == pytest.approx(0.04) and at(30)["teacher_temp"] == pytest.approx(0.07)
    assert at(199)["lr"] == pytest.approx(1e-6, abs=1e-6)
