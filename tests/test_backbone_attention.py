"""Every attention backend against the explicit math reference, dense and packed, values and grads."""

import pytest
import torch

from dinov2.layers import Attention, PackLayout, pack
from dinov2.layers.attention_backends import (
    attention, masked_sdpa_attention, math_attention, resolve_backend, sdpa_attention, xformers_works_on,
)


def reference_attention(q, k, v, lengths):
    """Attention image by image in float64 with explicit loops over images."""
    out, start = [], 0
    for n in lengths:
        qi, ki, vi = (t[start : start + n].double().transpose(0, 1) for t in (q, k, v))  # [H, n, d]
        weights = torch.softmax(qi @ ki.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        out.append((weights @ vi).transpose(0, 1))
        start += n
    return torch.cat(out)


LAYOUT = PackLayout(((2, 17), (3, 5), (1, 1)))


def _qkv(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(LAYOUT.total_tokens, 3, 8, generator=g, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("kernel", [math_attention, sdpa_attention, masked_sdpa_attention])
def test_backend_matches_per_image_reference(kernel):
    q, k, v = _qkv()
    want = reference_attention(q, k, v, LAYOUT.sequence_lengths)
    torch.testing.assert_close(kernel(q, k, v, LAYOUT).double(), want, atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_match_math():
    grads = {}
    for backend in ("math", "sdpa", "sdpa_masked"):
        q, k, v = _qkv(requires_grad=True)
        out = attention(q, k, v, LAYOUT, backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[backend] = [t.grad for t in (q, k, v)]
    for backend in ("sdpa", "sdpa_masked"):
        for a, b in zip(grads["math"], grads[backend]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_tokens_never_attend_across_images():
    q, k, v = _qkv()
    out = sdpa_attention(q, k, v, LAYOUT)
    v2 = v.clone()
    v2[:34] += 100.0  # change only the first group's values
    out2 = sdpa_attention(q, k, v2, LAYOUT)
    torch.testing.assert_close(out[34:], out2[34:])
    assert not torch.allclose(out[:34], out2[:34])


def test_block_diagonal_mask_matches_layout():
    mask = PackLayout(((2, 2), (1, 3))).block_diagonal_mask()
    want = torch.block_diag(torch.ones(2, 2), torch.ones(2, 2), torch.ones(3, 3)).bool()
    assert torch.equal(mask, want)


def test_auto_is_sdpa_on_cpu_and_unusable_xformers_is_refused():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    if not xformers_works_on(cpu):
        with pytest.raises(RuntimeError, match="xformers"):
            resolve_backend("xformers", cpu)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash3", cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA")
def test_xformers_matches_math_on_cuda():
    if not xformers_works_on(torch.device("cuda")):
        pytest.skip("xformers probe failed on this GPU")
    q, k, v = (t.cuda().half() for t in _qkv())
    got = attention(q, k, v, LAYOUT, "xformers").float().cpu()
    want = reference_attention(*(t.float().cpu() for t in (q, k, v)), LAYOUT.sequence_lengths).float()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", ["math", "sdpa", "sdpa_masked"])
def test_attention_module_packed_equals_dense_per_crop(backend):
    torch.manual_seed(0)
    module = Attention(32, num_heads=4, qkv_bias=True, backend=backend)
    crops = [torch.randn(2, 9, 32), torch.randn(3, 4, 32)]
    packed, layout = pack(crops)
    out = layout.split(module(packed, layout))
    for crop, got in zip(crops, out):
        torch.testing.assert_close(got, module(crop), atol=1e-6, rtol=1e-6)


def test_attention_module_matches_handwritten_formula():
    torch.manual_seed(1)
    module = Attention(16, num_heads=2, qkv_bias=True, backend="sdpa")
    x = torch.randn(3, 5, 16)
    qkv = (x @ module.qkv.weight.T + module.qkv.bias).view(3, 5, 3, 2, 8)
    q, k, v = (qkv[:, :, i].transpose(1, 2).double() for i in range(3))  # [B, H, N, d]
    heads = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    want = heads.transpose(1, 2).reshape(3, 5, 16) @ module.proj.weight.T.double() + module.proj.bias.double()
    torch.testing.assert_close(module(x).double(), want, atol=1e-5, rtol=1e-5)


def test_packed_input_without_layout_is_an_error():
    with pytest.raises(ValueError, match="PackLayout"):
        Attention(16, num_heads=2)(torch.randn(10, 16))
