"""Attention kernels over packed sequences, chosen once when a model is built for a device.

Backends (every one is tested against ``math`` on values and gradients):

- ``math``: explicit softmax(q k^T / sqrt(d)) v per group of equal-length images; the reference.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` per group of equal-length
  images (flash / memory-efficient / cuDNN kernels on CUDA, the fastest path measured on CPU).
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA): one flash kernel
  over the whole packed sequence with cumulative sequence lengths.
- ``xformers``: ``memory_efficient_attention`` with a ``BlockDiagonalMask`` over the whole packed
  sequence in one call. Package-index wheels often import fine but cannot run (xformers 0.0.35 ships no
  CUDA kernels; 0.0.34 needs torch 2.10.0 exactly): hence the forward-and-backward probe below.
- ``sdpa_masked``: one SDPA call over the whole packed sequence with a boolean block-diagonal
  mask. Correct but quadratic in the total token count; kept as the baseline benchmarks use.
- ``auto`` (a request, never stored on a model): ``resolve_backend`` probes ``varlen`` and
  ``xformers`` on the device (forward AND backward, in the training dtype, against ``math``),
  times the ones that work together with ``sdpa`` and returns the fastest; ``sdpa`` on CPU.

Resolution happens once, where the model meets its device (``DinoVisionTransformer.
resolve_attention_backend`` or ``dinov2.distributed.parallelize``); a forward pass only reads the
concrete name stored on each ``Attention`` module. Nothing here reads the environment or caches
probe results between calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov2.configs.choices import AttentionBackend

from .packing import PackLayout

logger = logging.getLogger(__name__)

BACKENDS = AttentionBackend.values()  # defined once, in the config schema's enums
CONCRETE_BACKENDS = BACKENDS[1:]  # all but "auto"
# Probed on CUDA by ``auto``, in order; ``sdpa`` is the fallback that always works.
_AUTO_CANDIDATES = ("varlen", "xformers")


def validate_backend(name: str, *, allow_auto: bool = True) -> str:
    choices = BACKENDS if allow_auto else CONCRETE_BACKENDS
    if name not in choices:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(choices)}")
    return name


def concrete_default(name: str | None) -> str:
    """The backend a freshly built module stores before it meets a device: ``auto`` -> ``sdpa``."""
    name = validate_backend(name or "auto")
    return "sdpa" if name == "auto" else name


# ------------------------------------------------------------------ kernels
def attention(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout, backend: str) -> Tensor:
    """``q, k, v``: ``[T, heads, head_dim]`` packed per ``layout``; returns ``[T, heads, head_dim]``."""
    if backend == "sdpa":
        return sdpa_attention(q, k, v, layout)
    if backend == "varlen":
        return varlen_attention(q, k, v, layout)
    if backend == "math":
        return math_attention(q, k, v, layout)
    if backend == "xformers":
        return xformers_attention(q, k, v, layout)
    if backend == "sdpa_masked":
        return masked_sdpa_attention(q, k, v, layout)
    raise ValueError(f"attention backend {backend!r} must be resolved first (one of {', '.join(CONCRETE_BACKENDS)})")


def _per_group(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout, kernel) -> Tensor:
    outputs = []
    for qg, kg, vg in zip(layout.split(q), layout.split(k), layout.split(v)):
        # [B, N, H, d] -> [B, H, N, d], the layout attention kernels want.
        out = kernel(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2))
        outputs.append(out.transpose(1, 2).flatten(0, 1))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout) -> Tensor:
    return _per_group(q, k, v, layout, F.scaled_dot_product_attention)


def _math_kernel(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def math_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout) -> Tensor:
    return _per_group(q, k, v, layout, _math_kernel)


def masked_sdpa_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout) -> Tensor:
    mask = layout.block_diagonal_mask(q.device)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu_seqlens = layout.cumulative_lengths(q.device)
    # Positional arguments only: the keyword set changed between torch 2.10 and 2.14.
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, layout.max_tokens, layout.max_tokens)


@lru_cache(maxsize=64)  # a pure function of the (hashable) layout: the mask object, not a probe result
def _xformers_block_mask(layout: PackLayout):
    from xformers.ops import fmha

    return fmha.BlockDiagonalMask.from_seqlens(list(layout.sequence_lengths))


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout) -> Tensor:
    from xformers.ops import memory_efficient_attention

    bias = _xformers_block_mask(layout) if len(layout.sequence_lengths) > 1 else None
    out = memory_efficient_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_bias=bias)
    return out.squeeze(0)


# ------------------------------------------------------------------ probing and resolution
@dataclass(frozen=True)
class ProbeResult:
    backend: str
    ok: bool
    error: str = ""


# Two groups of different lengths, so a kernel that ignores image boundaries fails the comparison.
_PROBE_LAYOUT = PackLayout(((2, 37), (3, 11)))


def _probe_inputs(layout: PackLayout, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[T, 3, heads, head_dim]``: q, k, v are its ``unbind(1)`` views, strided exactly as ``Attention`` makes them."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(layout.total_tokens, 3, heads, head_dim, generator=generator).to(device=device, dtype=dtype)


def probe_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32, *,
                  heads: int = 2, head_dim: int = 64) -> ProbeResult:
    """Run ``name`` forward AND backward on ``device`` in ``dtype`` and compare with ``math`` in float32.

    Any exception (missing package, kernel without this device/dtype, wrong values) means "do not use it".
    """
    validate_backend(name, allow_auto=False)
    try:
        layout = _PROBE_LAYOUT
        qkv = _probe_inputs(layout, heads, head_dim, device, dtype).requires_grad_()
        out = attention(*qkv.unbind(1), layout, name)
        weight = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
        (out.float() * weight).sum().backward()
        reference = qkv.detach().float().requires_grad_()
        want = math_attention(*reference.unbind(1), layout)
        (want * weight).sum().backward()
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        for got, expected in ((out, want), (qkv.grad, reference.grad)):
            if got is None or not torch.allclose(got.float(), expected, atol=tolerance, rtol=tolerance):
                return ProbeResult(name, False, "forward or backward differs from the math reference")
        return ProbeResult(name, True)
    except Exception as error:  # noqa: BLE001 - any failure means "do not use it"
        return ProbeResult(name, False, f"{type(error).__name__}: {error}".splitlines()[0][:200])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_backend(name: str, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int,
                  repeats: int = 5) -> float:
    """Milliseconds of forward+backward on a DINOv2-like packed layout (2x257 + 8x50 tokens, 4 images)."""
    layout = PackLayout(((8, 257), (32, 50)))
    qkv = _probe_inputs(layout, heads, head_dim, device, dtype).requires_grad_()

    def run() -> None:
        attention(*qkv.unbind(1), layout, name).sum().backward()

    run()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3 / repeats


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32, *,
                    heads: int = 2, head_dim: int = 64) -> str:
    """Turn a requested backend into the concrete one to store on the model for ``device``/``dtype``.

    ``auto``: ``sdpa`` off CUDA; on CUDA, each candidate (``varlen``, ``xformers``) that passes
    ``probe_backend`` is timed against ``sdpa`` at the model's head size and the fastest wins.
    An explicit ``varlen`` or ``xformers`` that fails its probe is an error naming why.
    """
    validate_backend(name)
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return "sdpa"
        timings = {"sdpa": _time_backend("sdpa", device, dtype, heads, head_dim)}
        for candidate in _AUTO_CANDIDATES:
            result = probe_backend(candidate, device, dtype, heads=heads, head_dim=head_dim)
            if result.ok:
                timings[candidate] = _time_backend(candidate, device, dtype, heads, head_dim)
            else:
                logger.info("attention backend %s unusable on %s (%s): %s", candidate, device, dtype, result.error)
        choice = min(timings, key=timings.get)
        logger.info("attention backend auto -> %s on %s (%s); fwd+bwd ms: %s", choice, device, dtype,
                    {k: round(v, 3) for k, v in timings.items()})
        return choice
    if name in _AUTO_CANDIDATES:
        result = probe_backend(name, device, dtype, heads=heads, head_dim=head_dim)
        if not result.ok:
            raise RuntimeError(
                f"attention backend {name!r} was requested but a forward+backward probe on {device} in {dtype} "
                f"failed ({result.error}); use 'auto' or 'sdpa'"
            )
    return name
