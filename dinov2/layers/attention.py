from __future__ import annotations

from torch import Tensor, nn

from .attention_backends import attention, concrete_default, validate_backend
from .packing import PackLayout, as_packed


class Attention(nn.Module):
    """Multi-head self-attention over packed tokens ``[T, D]`` (or a dense ``[B, N, D]`` batch).

    ``qkv`` and ``proj`` run once on all tokens; only the kernel in the middle sees the
    image boundaries. Key names (``qkv``, ``proj``) match the released checkpoints.

    ``backend`` is a concrete kernel name (``auto`` is stored as ``sdpa``, which runs everywhere);
    the device-specific choice is made once by ``resolve_backend`` and set with ``set_backend``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        if attn_drop:
            raise ValueError("attention dropout is not supported by the fused kernels; use attn_drop=0")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5  # what every kernel applies; read where attention is recomputed (eval, ONNX)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = concrete_default(backend)

    def set_backend(self, name: str) -> None:
        self.backend = validate_backend(name, allow_auto=False)

    def forward(self, x: Tensor, layout: PackLayout | None = None) -> Tensor:
        x, layout, dense_shape = as_packed(x, layout)
        tokens, dim = x.shape
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        out = attention(q, k, v, layout, self.backend)
        out = self.proj_drop(self.proj(out.reshape(tokens, dim)))
        return out.view(dense_shape) if dense_shape is not None else out
