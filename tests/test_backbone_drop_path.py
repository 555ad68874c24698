"""Stochastic depth: identity in eval, right expectation and untouched dropped images in training."""

import pytest
import torch

from dinov2.layers import Block, PackLayout, pack
from dinov2.layers.drop_path import add_residual_on_kept_subset, drop_path_per_image


def constant_branch(value):
    """A residual branch whose output is known: ``value`` for every token, plus call accounting."""
    calls = []

    def branch(x, layout):
        calls.append(layout)
        return torch.full_like(x, value)

    return branch, calls


def test_subset_runs_branch_only_on_kept_images_and_rescales():
    layout = PackLayout(((8, 3), (10, 2)))
    x = torch.zeros(layout.total_tokens, 4)
    branch, calls = constant_branch(1.0)
    out = add_residual_on_kept_subset(x, layout, branch, drop_prob=0.5)
    # Compute is skipped: the branch saw int(8*0.5)=4 and int(10*0.5)=5 images only.
    assert calls[0].groups == ((4, 3), (5, 2))
    per_image = [chunk.reshape(b, -1) for chunk, (b, _) in zip(torch.split(out, [24, 20]), layout.groups)]
    for images, (batch, _) in zip(per_image, layout.groups):
        kept = images.abs().sum(1) > 0
        assert kept.sum() == batch // 2
        assert torch.all(images[~kept] == 0)  # dropped images untouched
        torch.testing.assert_close(images[kept], torch.full_like(images[kept], batch / (batch // 2)))


def test_subset_expectation_equals_full_residual():
    torch.manual_seed(0)
    layout = PackLayout(((6, 2),))
    x = torch.randn(12, 3)
    branch, _ = constant_branch(0.5)
    mean = torch.stack([add_residual_on_kept_subset(x, layout, branch, 0.4) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, x + 0.5, atol=0.03, rtol=0)


def test_per_image_drop_path_expectation_and_whole_images():
    torch.manual_seed(0)
    layout = PackLayout(((5, 4), (3, 2)))
    residual = torch.ones(layout.total_tokens, 2)
    samples = torch.stack([drop_path_per_image(residual, layout, 0.1) for _ in range(4000)])
    torch.testing.assert_close(samples.mean(0), residual, atol=0.03, rtol=0)
    first = samples[0, :20, 0].view(5, 4)
    assert torch.all(first == first[:, :1])  # an image is dropped or kept as a whole


@pytest.mark.parametrize("rate", [0.05, 0.4])
def test_block_is_deterministic_identity_of_rate_in_eval(rate):
    torch.manual_seed(0)
    block = Block(16, num_heads=2, init_values=1.0, drop_path=rate)
    reference = Block(16, num_heads=2, init_values=1.0, drop_path=0.0)
    reference.load_state_dict(block.state_dict())
    crops = [torch.randn(4, 5, 16), torch.randn(6, 3, 16)]
    packed, layout = pack(crops)
    block.eval(), reference.eval()
    torch.testing.assert_close(block(packed, layout), reference(packed, layout))
    block.train()
    assert not torch.allclose(block(packed, layout), reference(packed, layout))


def test_block_training_keeps_dropped_images_unchanged_except_other_branch():
    torch.manual_seed(0)
    block = Block(8, num_heads=2, init_values=1.0, drop_path=0.9).train()
    x = torch.randn(10, 4, 8)
    out = block(x)
    # With rate 0.9 only one image per branch is kept: at least 8 of 10 images pass untouched.
    untouched = (out == x).all(dim=2).all(dim=1)
    assert untouched.sum() >= 8


def _reference_subset_residual(x, layout, residual_fn, drop_prob):
    """The out-of-place formulation: per-token scales and one index_add over a copy of the stream."""
    kept_images, scales = [], []
    for batch, tokens in layout.groups:
        kept = max(int(batch * (1.0 - drop_prob)), 1)
        kept_images.append(torch.randperm(batch)[:kept])
        scales.append(torch.full((kept * tokens,), batch / kept))
    token_index, subset_layout = layout.token_indices_of_images(kept_images)
    residual = residual_fn(x[token_index], subset_layout)
    return torch.index_add(x, 0, token_index, residual * torch.cat(scales)[:, None])


@pytest.mark.parametrize("inplace", [False, True])
def test_subset_values_and_gradients_equal_the_out_of_place_formula(inplace):
    layout = PackLayout(((6, 5), (8, 3)))
    weight = torch.randn(4, 4)
    grads = []
    for fn in (_reference_subset_residual, add_residual_on_kept_subset):
        x0 = torch.randn(layout.total_tokens, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        w = weight.clone().requires_grad_()
        x = x0 * 1.0 if inplace else x0  # in place only on a tensor the caller owns
        torch.manual_seed(0)  # the same kept images in both
        kwargs = {"inplace": True} if inplace and fn is add_residual_on_kept_subset else {}
        out = fn(x, layout, lambda t, lay: torch.tanh(t @ w), 0.4, **kwargs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), x0.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)


def test_block_never_writes_to_its_input():
    torch.manual_seed(0)
    block = Block(8, num_heads=2, init_values=1.0, drop_path=0.5).train()
    crops = [torch.randn(4, 5, 8), torch.randn(6, 3, 8)]
    packed, layout = pack(crops)
    before = packed.clone()
    block(packed, layout)
    assert torch.equal(packed, before)
