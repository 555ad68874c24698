"""iBOTPatchLoss against float64 references written from the iBOT / DINOv2 papers."""

import math

import numpy as np
import pytest
import torch

from dinov2.loss import iBOTPatchLoss


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def t32(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def make_case(seed, B=3, N=5, K=6):
    rng = np.random.default_rng(seed)
    masks = rng.random((B, N)) < 0.5
    masks[-1] = False  # an image without masked patches must contribute nothing
    masks[0, 0] = True
    student = rng.normal(size=(B, N, K))
    teacher = np.exp(np_log_softmax(rng.normal(size=(B, N, K)) / 0.07))
    return masks, student, teacher


def reference_masked_loss(masks, student, teacher, temp=0.1):
    """- (1/B) sum_b (1/max(n_b,1)) sum_{n masked in b} sum_k t log softmax(s / temp)."""
    B, N, _ = student.shape
    total = 0.0
    for b in range(B):
        n_b = masks[b].sum()
        for n in range(N):
            if masks[b, n]:
                total += np.sum(teacher[b, n] * np_log_softmax(student[b, n] / temp)) / max(n_b, 1)
    return -total / B


def gather(masks, x):
    """Masked tokens in row-major order (what the collate / trainer gathers)."""
    return np.stack([x[b, n] for b in range(masks.shape[0]) for n in range(masks.shape[1]) if masks[b, n]])


# ------------------------------------------------------------------ losses
def test_forward_masked_matches_reference():
    masks, s, t = make_case(0)
    out = iBOTPatchLoss(6).forward_masked(t32(gather(masks, s)), t32(gather(masks, t)), torch.from_numpy(masks))
    assert out.item() == pytest.approx(reference_masked_loss(masks, s, t), rel=1e-5)


def test_forward_full_grid_matches_reference():
    masks, s, t = make_case(1)
    out = iBOTPatchLoss(6)(t32(s), t32(t), torch.from_numpy(masks))
    assert out.item() == pytest.approx(reference_masked_loss(masks, s, t), rel=1e-5)


def test_forward_masked_hand_computed():
    # Uniform student over K=2: every masked token costs log 2. Image 0 has 2 masked tokens
    # (weight 1/2 each), image 1 none, divided by B = 2 images -> log(2) / 2.
    masks = torch.tensor([[True, False, True], [False, False, False]])
    s = torch.zeros(2, 2)
    t = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert iBOTPatchLoss(2).forward_masked(s, t, masks).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_forward_masked_ignores_padding_beyond_n_masked_patches():
    masks, s, t = make_case(2)
    s_m, t_m = gather(masks, s), gather(masks, t)
    M = len(s_m)
    pad_s = np.concatenate([s_m, np.full((3, 6), 50.0)])
    pad_t = np.concatenate([t_m, np.full((3, 6), 1 / 6)])
    out = iBOTPatchLoss(6).forward_masked(t32(pad_s), t32(pad_t), torch.from_numpy(masks), n_masked_patches=M)
    assert out.item() == pytest.approx(reference_masked_loss(masks, s, t), rel=1e-5)


def test_forward_masked_uses_given_weights():
    masks, s, t = make_case(3)
    s_m, t_m = gather(masks, s), gather(masks, t)
    w = np.arange(1, len(s_m) + 1, dtype=np.float64)
    ref = -sum(w[i] * np.sum(t_m[i] * np_log_softmax(s_m[i] / 0.1)) for i in range(len(w))) / masks.shape[0]
    out = iBOTPatchLoss(6).forward_masked(t32(s_m), t32(t_m), torch.from_numpy(masks), masks_weight=t32(w))
    assert out.item() == pytest.approx(ref, rel=1e-5)


def test_forward_masked_gradient_flows_only_to_student():
    masks, s, t = make_case(4)
    s_m = t32(gather(masks, s)).requires_grad_()
    iBOTPatchLoss(6).forward_masked(s_m, t32(gather(masks, t)), torch.from_numpy(masks)).backward()
    assert torch.isfinite(s_m.grad).all() and s_m.grad.abs().sum() > 0


# ------------------------------------------------------------------ centering
def test_softmax_center_teacher_keeps_shape_and_matches_reference():
    rng = np.random.default_rng(5)
    center = rng.normal(size=(1, 1, 4))
    loss = iBOTPatchLoss(4)
    loss.center.copy_(t32(center))
    for shape in [(2, 3, 4), (7, 4)]:
        x = rng.normal(size=shape)
        out = loss.softmax_center_teacher(t32(x), 0.07)
        assert out.shape == shape
        flat, ref = x.reshape(-1, 4), []
        for row in flat:
            z = (row - center[0, 0]) / 0.07
            ref.append(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
        np.testing.assert_allclose(out.numpy().reshape(-1, 4), np.array(ref), rtol=1e-5, atol=1e-6)


def test_update_center_mean_of_per_image_token_means():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 5, 4))
    loss = iBOTPatchLoss(4, center_momentum=0.9)
    assert loss.center.shape == (1, 1, 4)
    loss.update_center(t32(x))
    ref = 0.1 * np.mean([x[b].mean(axis=0) for b in range(3)], axis=0)
    np.testing.assert_allclose(loss.center.numpy().reshape(-1), ref, rtol=1e-5, atol=1e-7)
    # [M, K] gathered tokens: the mean over all M tokens.
    y = rng.normal(size=(9, 4))
    loss.update_center(t32(y))
    ref = 0.9 * ref + 0.1 * y.mean(axis=0)
    np.testing.assert_allclose(loss.center.numpy().reshape(-1), ref, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ Sinkhorn-Knopp
def np_sinkhorn(scores, temp, n_iterations):
    Q = np.exp(scores / temp).T
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(axis=1, keepdims=True) / K
        Q = Q / Q.sum(axis=0, keepdims=True) / B
    return (Q * B).T


def test_sinkhorn_matches_reference_and_leaves_count_untouched():
    rng = np.random.default_rng(7)
    scores = rng.normal(scale=0.3, size=(10, 6))
    n = torch.tensor([10])
    out = iBOTPatchLoss(6).sinkhorn_knopp_teacher(t32(scores), 0.04, n_masked_patches_tensor=n)
    np.testing.assert_allclose(out.numpy(), np_sinkhorn(scores, 0.04, 3), rtol=1e-5, atol=1e-7)
    assert n.item() == 10
    out_int = iBOTPatchLoss(6).sinkhorn_knopp_teacher(t32(scores), 0.04, 10, n_iterations=3)
    torch.testing.assert_close(out, out_int)
    assert torch.allclose(out.sum(1), torch.ones(10))
