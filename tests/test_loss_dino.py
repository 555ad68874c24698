"""DINOLoss against float64 references written from the DINO / SwAV papers."""

import math

import numpy as np
import pytest
import torch

from dinov2.loss import DINOLoss, sinkhorn_knopp


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_sinkhorn(scores, temp, n_iterations):
    """SwAV appendix A.1 (K x B notation), float64."""
    Q = np.exp(scores / temp).T
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(axis=1, keepdims=True) / K  # each prototype gets 1/K
        Q = Q / Q.sum(axis=0, keepdims=True) / B  # each sample gets 1/B
    return (Q * B).T


def t32(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


# ------------------------------------------------------------------ softmax centering
def test_softmax_center_teacher_matches_reference():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(5, 7))
    center = rng.normal(size=(1, 7))
    loss = DINOLoss(7)
    loss.center.copy_(t32(center))
    out = loss.softmax_center_teacher(t32(teacher), teacher_temp=0.04).numpy()
    ref = np.empty_like(teacher)
    for i in range(5):
        z = (teacher[i] - center[0]) / 0.04
        e = np.exp(z - z.max())
        ref[i] = e / e.sum()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_center_buffer_is_registered_zeros():
    loss = DINOLoss(11)
    assert loss.center.shape == (1, 11) and torch.all(loss.center == 0)
    assert "center" in loss.state_dict()


# ------------------------------------------------------------------ cross-entropy
def test_forward_sums_mean_cross_entropy_over_all_pairs():
    rng = np.random.default_rng(1)
    B, K = 4, 9
    students = [rng.normal(size=(B, K)) for _ in range(3)]
    teachers = [np.exp(np_log_softmax(rng.normal(size=(B, K)) / 0.07)) for _ in range(2)]
    ref = 0.0
    for s in students:
        for t in teachers:
            ce = 0.0
            for i in range(B):
                ce += -np.sum(t[i] * np_log_softmax(s[i] / 0.1))
            ref += ce / B
    out = DINOLoss(K)([t32(s) for s in students], [t32(t) for t in teachers])
    assert out.shape == ()
    assert out.item() == pytest.approx(ref, rel=1e-5)


def test_forward_hand_computed_cases():
    loss = DINOLoss(2, student_temp=0.1)
    # Uniform student: every pair costs log 2; 2 students x 3 teachers = 6 pairs.
    students = [torch.zeros(3, 2)] * 2
    teachers = [torch.tensor([[0.3, 0.7]] * 3)] * 3
    assert loss(students, teachers).item() == pytest.approx(6 * math.log(2), rel=1e-6)
    # s / 0.1 = [ln 3, 0] -> p = [3/4, 1/4]; one-hot teacher on class 0 -> -ln(3/4).
    s = torch.tensor([[0.1 * math.log(3.0), 0.0]])
    t = torch.tensor([[1.0, 0.0]])
    assert loss([s], [t]).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_forward_gradient_is_softmax_minus_target():
    # d/ds of sum_pairs mean_i H(t_i, softmax(s_i / T)) = sum_t (softmax(s/T) - t) / (T * B)
    rng = np.random.default_rng(2)
    B, K, T = 3, 5, 0.1
    s = rng.normal(size=(B, K))
    teachers = [np.exp(np_log_softmax(rng.normal(size=(B, K)))) for _ in range(2)]
    s_t = t32(s).requires_grad_()
    DINOLoss(K, student_temp=T)([s_t], [t32(t) for t in teachers]).backward()
    p = np.exp(np_log_softmax(s / T))
    ref = sum((p - t) / (T * B) for t in teachers)
    np.testing.assert_allclose(s_t.grad.numpy(), ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ center EMA
def test_update_center_is_ema_of_batch_mean():
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(6, 4)) for _ in range(3)]
    loss = DINOLoss(4, center_momentum=0.8)
    c = np.zeros((1, 4))
    for x in batches:
        loss.update_center(t32(x))
        c = 0.8 * c + 0.2 * x.mean(axis=0, keepdims=True)
        np.testing.assert_allclose(loss.center.numpy(), c, rtol=1e-5, atol=1e-7)


def test_split_update_matches_official_deferred_order():
    """reduce now, apply before the next centering == update_center, for the usual order."""
    rng = np.random.default_rng(4)
    batches = [t32(rng.normal(size=(5, 6))) for _ in range(4)]
    eager, deferred = DINOLoss(6), DINOLoss(6)
    for x in batches:
        a = eager.softmax_center_teacher(x, 0.05)
        eager.update_center(x)
        b = deferred.softmax_center_teacher(x, 0.05)
        deferred.reduce_center_update(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    before = deferred.center.clone()
    deferred.apply_center_update()
    assert not torch.equal(before, deferred.center)
    torch.testing.assert_close(eager.center, deferred.center, rtol=0, atol=0)


def test_state_dict_includes_pending_update_and_load_discards_it():
    x = torch.ones(2, 3)
    loss = DINOLoss(3, center_momentum=0.5)
    loss.reduce_center_update(x)
    assert torch.allclose(loss.state_dict()["center"], torch.full((1, 3), 0.5))
    other = DINOLoss(3, center_momentum=0.5)
    other.reduce_center_update(torch.full((2, 3), 100.0))
    other.load_state_dict({"center": torch.full((1, 3), 7.0)})
    other.apply_center_update()  # nothing pending any more
    assert torch.equal(other.center, torch.full((1, 3), 7.0))


def test_low_precision_teacher_updates_float32_center():
    x = torch.randn(8, 5).to(torch.bfloat16)
    loss = DINOLoss(5)
    loss.update_center(x)
    assert loss.center.dtype == torch.float32
    torch.testing.assert_close(loss.center, 0.1 * x.float().mean(0, keepdim=True))


# ------------------------------------------------------------------ Sinkhorn-Knopp
@pytest.mark.parametrize("n_iterations", [1, 3, 10])
def test_sinkhorn_matches_float64_reference(n_iterations):
    rng = np.random.default_rng(5)
    scores = rng.normal(scale=0.5, size=(12, 7))
    out = DINOLoss(7).sinkhorn_knopp_teacher(t32(scores), 0.05, n_iterations=n_iterations)
    assert out.shape == (12, 7) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), np_sinkhorn(scores, 0.05, n_iterations), rtol=1e-5, atol=1e-7)


def test_sinkhorn_converges_to_equipartition():
    rng = np.random.default_rng(6)
    B, K = 16, 4
    out = sinkhorn_knopp(t32(rng.normal(scale=0.1, size=(B, K))), 0.1, n_iterations=300).double()
    torch.testing.assert_close(out.sum(1), torch.ones(B, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum(0), torch.full((K,), B / K, dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.all(out >= 0)


def test_sinkhorn_is_a_diagonal_scaling_of_exp_scores():
    """Q = diag(a) exp(S/T) diag(b): all 2x2 log cross-ratios equal those of S/T."""
    rng = np.random.default_rng(7)
    S = rng.normal(size=(6, 5))
    logQ = np.log(sinkhorn_knopp(t32(S), 0.5, n_iterations=3).double().numpy())
    cross = lambda M: M[:-1, :-1] - M[:-1, 1:] - M[1:, :-1] + M[1:, 1:]  # noqa: E731
    np.testing.assert_allclose(cross(logQ), cross(S / 0.5), atol=1e-4)


def test_sinkhorn_is_finite_where_naive_exp_overflows():
    # 10 / 0.04 = 250 > 88: exp overflows float32 (the official code would give NaN).
    rng = np.random.default_rng(8)
    scores = 10.0 + rng.normal(scale=0.05, size=(8, 5))
    out = DINOLoss(5).sinkhorn_knopp_teacher(t32(scores), 0.04)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), np_sinkhorn(scores, 0.04, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_runs_without_process_group():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    out = DINOLoss(3).sinkhorn_knopp_teacher(torch.randn(4, 3, dtype=torch.float16), 0.1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_sinkhorn_result_does_not_depend_on_the_sample_count():
    """The official B (global sample count) only scales intermediate values: any value gives the same
    targets, which is why the folded implementation needs no count on the device."""
    rng = np.random.default_rng(8)
    scores = rng.normal(scale=0.5, size=(9, 5))
    want = np_sinkhorn(scores, 0.05, 3)
    for n_samples in (None, 9, 1000, torch.tensor([3])):
        np.testing.assert_allclose(sinkhorn_knopp(t32(scores), 0.05, 3, n_samples=n_samples).numpy(), want,
                                   rtol=1e-5, atol=1e-7)


def test_sinkhorn_of_low_precision_logits_is_float32_and_leaves_the_input():
    logits = torch.randn(12, 7).bfloat16()
    before = logits.clone()
    out = sinkhorn_knopp(logits, 0.05)
    assert out.dtype == torch.float32 and torch.equal(logits, before)
    np.testing.assert_allclose(out.numpy(), np_sinkhorn(logits.double().numpy(), 0.05, 3), rtol=1e-4, atol=1e-6)
    fp32 = torch.randn(12, 7)
    kept = fp32.clone()
    sinkhorn_knopp(fp32, 0.05)
    assert torch.equal(fp32, kept)
