"""Attention kernels over packed sequences, chosen at run time.

Backends (every one is tested against ``math`` on values and gradients):

- ``math``: explicit softmax(q k^T / sqrt(d)) v per group of equal-length images; the reference.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` per group of equal-length
  images (flash / memory-efficient / cuDNN kernels on CUDA, the fastest path measured on CPU).
- ``xformers``: ``memory_efficient_attention`` with a ``BlockDiagonalMask`` over the whole packed
  sequence in one call. Selected by ``auto`` only after a probe call on the actual device
  succeeded: index wheels often import fine but cannot run (see ENVIRONMENT.md).
- ``sdpa_masked``: one SDPA call over the whole packed sequence with a boolean block-diagonal
  mask. Correct but quadratic in the total token count; kept as the baseline benchmarks use.
- ``auto``: ``xformers`` on CUDA when the probe succeeds, else ``sdpa``.

``DINOV2_ATTENTION_BACKEND`` in the environment sets the default for new models.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import PackLayout

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa", "math", "sdpa_masked")
ENV_VAR = "DINOV2_ATTENTION_BACKEND"


def default_backend() -> str:
    return validate_backend(os.environ.get(ENV_VAR, "auto"))


def validate_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend for ``device``; refuse an unusable ``xformers``."""
    validate_backend(name)
    if name == "auto":
        return "xformers" if device.type == "cuda" and xformers_works_on(device) else "sdpa"
    if name == "xformers" and not xformers_works_on(device):
        raise RuntimeError(
            f"attention backend 'xformers' was requested but a probe call on {device} failed "
            f"({_XFORMERS_PROBE_ERRORS.get(str(device), 'not importable')}); use 'auto' or 'sdpa'"
        )
    return name


_XFORMERS_PROBE_ERRORS: dict[str, str] = {}


@lru_cache(maxsize=None)
def xformers_works_on(device: torch.device) -> bool:
    """Run one small block-diagonal call on ``device`` and compare it with the math reference."""
    try:
        from xformers.ops import fmha

        layout = PackLayout(((2, 5), (3, 2)))
        generator = torch.Generator().manual_seed(0)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        q, k, v = (
            torch.randn(layout.total_tokens, 2, 64, generator=generator).to(device=device, dtype=dtype)
            for _ in range(3)
        )
        got = xformers_attention(q, k, v, layout)
        want = math_attention(q.float(), k.float(), v.float(), layout)
        ok = torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2)
        if not ok:
            _XFORMERS_PROBE_ERRORS[str(device)] = "probe result differs from the math reference"
        del fmha
        return bool(ok)
    except Exception as error:  # noqa: BLE001 - any failure means "do not use it"
        _XFORMERS_PROBE_ERRORS[str(device)] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        logger.info("xformers unusable on %s: %s", device, _XFORMERS_PROBE_ERRORS[str(device)])
        return False


def attention(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout, backend: str) -> Tensor:
    """``q, k, v``: ``[T, heads, head_dim]`` packed per ``layout``; returns ``[T, heads, head_dim]``."""
    if backend == "sdpa":
        return sdpa_attention(q, k, v, layout)
    if backend == "math":
        return math_attention(q, k, v, layout)
    if backend == "xformers":
        return xformers_attention(q, k, v, layout)
    if backend == "sdpa_masked":
        return masked_sdpa_attention(q, k, v, layout)
    raise ValueError(f"attention backend {backend!r} must be resolved first (one of {', '.join(BACKENDS[1:])})")


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


@lru_cache(maxsize=64)
def _xformers_block_mask(layout: PackLayout):
    from xformers.ops import fmha

    return fmha.BlockDiagonalMask.from_seqlens(layout.sequence_lengths)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackLayout) -> Tensor:
    from xformers.ops import memory_efficient_attention

    bias = _xformers_block_mask(layout) if len(layout.sequence_lengths) > 1 else None
    out = memory_efficient_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_bias=bias)
    return out.squeeze(0)
