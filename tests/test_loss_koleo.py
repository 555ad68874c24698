"""KoLeoLoss against a brute-force float64 nearest-neighbour reference (Sablayrolles et al.)."""

import math

import numpy as np
import pytest
import torch

from dinov2.loss import KoLeoLoss


def reference_koleo(x, eps=1e-8):
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    total = 0.0
    for i in range(len(x)):
        nearest = min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
        total += -math.log(nearest + eps)
    return total / len(x)


def test_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(17, 8))
    out = KoLeoLoss()(torch.from_numpy(x).float())
    assert out.dtype == torch.float32 and out.shape == ()
    assert out.item() == pytest.approx(reference_koleo(x), rel=1e-5)


def test_hand_computed_square():
    # Four unit vectors at 0, 90, 180, 270 degrees: each nearest distance is sqrt(2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-6)


def test_antipodal_pair_is_not_its_own_neighbour():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(2.0), abs=1e-6)


def test_identical_rows_give_finite_loss_and_gradient():
    # Two pairs of identical rows: the pairwise-distance eps gives ||0 + eps * 1|| = eps sqrt(D).
    D = 4
    a, b = torch.randn(D), torch.randn(D)
    x = torch.stack([a, a, b, b]).requires_grad_()
    loss = KoLeoLoss()(x)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(-math.log(1e-8 * math.sqrt(D) + 1e-8), rel=1e-4)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_scale_invariant_and_float32_under_autocast():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(9, 6))).float()
    loss = KoLeoLoss()
    assert loss(5.0 * x).item() == pytest.approx(loss(x).item(), rel=1e-5)
    xb = x.to(torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = loss(xb)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(reference_koleo(xb.float().numpy().astype(np.float64)), rel=1e-5)


def test_gradient_step_spreads_points():
    torch.manual_seed(0)
    x = (torch.randn(16, 3) * 0.1 + torch.tensor([1.0, 0.0, 0.0])).requires_grad_()
    loss = KoLeoLoss()
    before = loss(x)
    before.backward()
    with torch.no_grad():
        x -= 0.01 * x.grad
    assert loss(x).item() < before.item()
