from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .attention import Attention
from .drop_path import SUBSET_DROP_THRESHOLD, add_residual_on_kept_subset, drop_path_per_image
from .layer_scale import LayerScale
from .mlp import Mlp
from .packing import PackLayout, as_packed


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth over packed tokens.

    Accepts a dense batch ``[B, N, D]`` or packed tokens ``[T, D]`` with their ``PackLayout``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
        attention_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
            attn_drop=attn_drop, proj_drop=drop, backend=attention_backend,
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, bias=ffn_bias
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def _attn_branch(self, x: Tensor, layout: PackLayout) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), layout))

    def _ffn_branch(self, x: Tensor, layout: PackLayout) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, layout: PackLayout | None = None) -> Tensor:
        x, layout, dense_shape = as_packed(x, layout)
        rate = self.sample_drop_ratio if self.training else 0.0
        owned = False  # the caller's tensor is never written to; ours (after the first branch) is
        for branch in (self._attn_branch, self._ffn_branch):
            if rate > SUBSET_DROP_THRESHOLD:
                x = add_residual_on_kept_subset(x, layout, branch, rate, inplace=owned)
            else:
                x = x + drop_path_per_image(branch(x, layout), layout, rate)
            owned = True
        return x.view(dense_shape) if dense_shape is not None else x
