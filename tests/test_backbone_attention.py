"""Every attention backend against the explicit math reference, dense and packed, values and grads."""

import pytest
import torch

from dinov2.layers import Attention, PackLayout, pack
from dinov2.layers.attention_backends import (
    attention, masked_sdpa_attention, math_attention, probe_backend, resolve_backend, sdpa_attention,
    varlen_available,
)
from dinov2.models.vision_transformer import DinoVisionTransformer


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


def test_auto_is_sdpa_on_cpu_and_unusable_kernels_are_refused():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    for name in ("xformers", "varlen"):  # no CPU kernels: the probe fails, an explicit request is an error
        assert not probe_backend(name, cpu).ok
        with pytest.raises(RuntimeError, match=f"'{name}' was requested but a forward\\+backward probe"):
            resolve_backend(name, cpu)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash3", cpu)


def test_probe_passes_for_a_working_kernel_and_reports_a_wrong_one(monkeypatch):
    assert probe_backend("sdpa", torch.device("cpu")).ok
    assert probe_backend("sdpa", torch.device("cpu"), torch.bfloat16).ok
    import dinov2.layers.attention_backends as backends

    # A kernel that ignores image boundaries (one softmax over the whole packed sequence) is refused.
    monkeypatch.setattr(backends, "sdpa_attention", lambda q, k, v, layout: masked_sdpa_attention(
        q, k, v, type(layout).dense(1, layout.total_tokens)))
    result = probe_backend("sdpa", torch.device("cpu"))
    assert not result.ok and "differs from the math reference" in result.error


def test_backend_is_stored_once_and_not_read_from_the_environment(monkeypatch, tiny_vit_kwargs):
    monkeypatch.setenv("DINOV2_ATTENTION_BACKEND", "math")  # the old call-time default: ignored now
    model = DinoVisionTransformer(**tiny_vit_kwargs)
    assert model.attention_backend == "sdpa"  # auto before meeting a device
    assert model.resolve_attention_backend(torch.device("cpu")) == "sdpa"
    model.set_attention_backend("math")
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"math"}
    with pytest.raises(ValueError, match="unknown attention backend 'auto'"):
        model.set_attention_backend("auto")  # a model stores concrete kernels only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA")
def test_xformers_matches_math_on_cuda():
    if not probe_backend("xformers", torch.device("cuda"), torch.float16).ok:
        pytest.skip("xformers probe failed on this GPU")
    q, k, v = (t.cuda().half() for t in _qkv())
    got = attention(q, k, v, LAYOUT, "xformers").float().cpu()
    want = reference_attention(*(t.float().cpu() for t in (q, k, v)), LAYOUT.sequence_lengths).float()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available() or not varlen_available(), reason="varlen_attn needs CUDA, torch>=2.10")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_matches_math_on_cuda(dtype):
    grads = {}
    for backend in ("math", "varlen"):
        q, k, v = (t.cuda().to(dtype).requires_grad_() for t in _qkv())
        out = attention(q, k, v, LAYOUT, backend)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        grads[backend] = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
    for a, b in zip(grads["math"], grads["varlen"]):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)


def test_cumulative_lengths_match_the_layout():
    assert LAYOUT.cumulative_lengths().tolist() == [0, 17, 34, 39, 44, 49, 50]
    assert LAYOUT.cumulative_lengths().dtype == torch.int32
    assert LAYOUT.max_tokens == 17


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
