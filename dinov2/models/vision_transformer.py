"""The DINOv2 Vision Transformer, with the official builders, keyword arguments and state-dict keys.

Differences from the official code are internal only: every block works on packed tokens, so a
list of crops of different sizes runs through ONE pass (no padding, one matmul per linear
layer), and the attention kernel is a run-time choice (see ``dinov2.layers.attention_backends``).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from dinov2.configs.choices import Arch, FfnLayer
from dinov2.layers import Attention, Block, Mlp, PatchEmbed, SwiGLUFFNFused, pack
from dinov2.layers.attention_backends import resolve_backend, validate_backend
from dinov2.layers.layer_norm import LayerNorm
from dinov2.layers.initialization import InitStep, construction_steps, post_order, run_init_steps
from dinov2.layers.packing import PackLayout
from dinov2.models.arch import ARCH_SHAPES
from dinov2.models.pos_embed import resample_patch_pos_embed

FFN_LAYERS = FfnLayer.values()  # defined once, in the config schema's enums


def _identity_ffn(*args, **kwargs) -> nn.Module:
    return nn.Identity()


def _ffn_layer(name: str) -> Callable[..., nn.Module]:
    if name == "mlp":
        return Mlp
    if name in ("swiglu", "swiglufused"):  # the official code maps both to the fused-width SwiGLU
        return SwiGLUFFNFused
    if name == "identity":
        return _identity_ffn
    raise ValueError(f"unknown ffn_layer {name!r}; choose one of {', '.join(FFN_LAYERS)}")


def init_weights_vit_timm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DinoVisionTransformer(nn.Module):
    """The official ``DinoVisionTransformer`` (same arguments) with the released, flat block keys ``blocks.{i}``.

    ``block_chunks`` does not change the module tree (officially it grouped the blocks in ``BlockChunk``
    containers, keys ``blocks.{chunk}.{i}``, each one FSDP1 unit). It must be 0 or divide ``depth`` and keeps
    its sharding meaning only: ``dinov2.distributed.fsdp`` makes each run of ``depth / block_chunks``
    consecutive blocks one FSDP unit (0: one unit per block). Chunked state dicts load through
    ``dinov2.hub.filters.backbone_filter_fn``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = Block,
        ffn_layer: str = "mlp",
        block_chunks: int = 0,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attention_backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if block_chunks < 0 or (block_chunks > 0 and depth % block_chunks):
            raise ValueError(f"block_chunks={block_chunks} must be 0 or divide depth={depth}")
        norm_layer = partial(LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            drop_rates = [drop_path_rate] * depth
        else:
            drop_rates = np.linspace(0, drop_path_rate, depth).tolist()  # float64, as the official code
        ffn = _ffn_layer(ffn_layer)
        blocks = [
            block_fn(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_bias=proj_bias, ffn_bias=ffn_bias, drop_path=drop_rates[i], norm_layer=norm_layer,
                act_layer=act_layer, ffn_layer=ffn, init_values=init_values, attention_backend=attention_backend,
            )
            for i in range(depth)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.block_chunks = block_chunks  # FSDP units of consecutive blocks (dinov2.distributed.fsdp); 0 = per block

        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    # ------------------------------------------------------------------ setup
    def _init_tokens(self) -> None:
        nn.init.zeros_(self.mask_token)  # zeros from the constructor; set again for a meta-device build
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def _explicit_init_steps(self) -> list[InitStep]:
        linears = [m for m in post_order(self) if isinstance(m, nn.Linear)]  # the modules the init changes
        return [(self, DinoVisionTransformer._init_tokens)] + [(m, init_weights_vit_timm) for m in linears]

    def init_weights(self) -> None:
        run_init_steps(self._explicit_init_steps())

    def init_steps(self) -> list[InitStep]:
        """Every random draw of a fresh build, in order: constructors' defaults, then ``init_weights``.
        Run them (``run_init_steps``) after ``to_empty`` to get the weights a plain build would have."""
        return construction_steps(self) + self._explicit_init_steps()

    def set_attention_backend(self, name: str) -> None:
        """Store a concrete attention kernel on every block (see ``resolve_attention_backend`` for ``auto``)."""
        validate_backend(name, allow_auto=False)
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_backend(name)

    @property
    def attention_backend(self) -> str:
        return next(m.backend for m in self.modules() if isinstance(m, Attention))

    def resolve_attention_backend(self, device: torch.device, dtype: torch.dtype = torch.float32,
                                  requested: str = "auto") -> str:
        """Choose the kernel for ``device``/``dtype`` once (probes and timings at this model's head size)
        and store it; forward passes only read it."""
        name = resolve_backend(requested, device, dtype, heads=self.num_heads, head_dim=self.embed_dim // self.num_heads)
        self.set_attention_backend(name)
        return name

    # ------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embeddings for an image of ``h x w`` pixels (tokens ``x`` give the dtype)."""
        grid = (h // self.patch_size, w // self.patch_size)
        num_patches = self.pos_embed.shape[1] - 1
        if grid[0] * grid[1] == num_patches and grid[0] == grid[1]:
            return self.pos_embed
        patch_pos = resample_patch_pos_embed(
            self.pos_embed[:, 1:], grid, interpolate_offset=self.interpolate_offset, antialias=self.interpolate_antialias
        )
        class_pos = self.pos_embed[:, :1].float()
        return torch.cat((class_pos, patch_pos), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        tokens = self.patch_embed(x)  # validates the shape first
        h, w = x.shape[-2:]
        if masks is not None:
            masks = self._check_masks(masks, tokens)
            # Masked patches become the mask token before position embeddings are added.
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, h, w)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens

    @staticmethod
    def _check_masks(masks: Tensor, tokens: Tensor) -> Tensor:
        batch, num_patches = tokens.shape[:2]
        if masks.dim() == 3:
            masks = masks.flatten(1)
        if masks.dtype != torch.bool:
            raise ValueError(f"masks must be boolean, got {masks.dtype}")
        if tuple(masks.shape) != (batch, num_patches):
            raise ValueError(
                f"masks of shape {tuple(masks.shape)} do not match the input: expected ({batch}, {num_patches}) "
                f"(one entry per patch)"
            )
        return masks

    # ------------------------------------------------------------------ forward
    def _run_blocks(self, tokens: Tensor, layout: PackLayout | None = None) -> Tensor:
        for block in self.blocks:
            tokens = block(tokens, layout)
        return tokens

    def _output_dict(self, prenorm: Tensor, normed: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : r + 1],
            "x_norm_patchtokens": normed[:, r + 1 :],
            "x_prenorm": prenorm,
            "masks": masks,
        }

    def forward_features_list(self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None) -> list[dict]:
        """All inputs in ONE packed pass through the blocks; one output dict per input."""
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} inputs but {len(masks_list)} masks; pass one mask (or None) per input")
        if len(x_list) == 0:
            raise ValueError("forward_features got an empty list of inputs")
        packed, layout = pack([self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)])
        packed = self._run_blocks(packed, layout)
        normed = self.norm(packed)
        return [
            self._output_dict(prenorm, norm_out, masks)
            for prenorm, norm_out, masks in zip(layout.split(packed), layout.split(normed), masks_list)
        ]

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None):
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks)
        tokens = self._run_blocks(self.prepare_tokens_with_masks(x, masks))
        return self._output_dict(tokens, self.norm(tokens), masks)

    def forward(self, *args, is_training: bool = False, **kwargs):
        features = self.forward_features(*args, **kwargs)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])

    # ------------------------------------------------------------------ intermediate layers
    def _get_intermediate_layers(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        blocks = list(self.blocks)
        wanted = set(range(len(blocks) - n, len(blocks))) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= len(blocks):
            raise ValueError(f"requested blocks {sorted(wanted)} but the model has blocks 0..{len(blocks) - 1}")
        tokens, outputs = self.prepare_tokens_with_masks(x), []
        for i, block in enumerate(blocks[: max(wanted) + 1]):
            tokens = block(tokens)
            if i in wanted:
                outputs.append(tokens)
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ):
        """Outputs of the last ``n`` blocks (or of the listed block indices), in block order."""
        outputs = self._get_intermediate_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, h, w = x.shape
            outputs = [
                out.reshape(batch, h // self.patch_size, w // self.patch_size, -1).permute(0, 3, 1, 2).contiguous()
                for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)


def _builder(embed_dim: int, depth: int, num_heads: int, doc: str):
    def build(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
        # Widths are fixed by the name; depth (and anything else) may be overridden, e.g. for tests.
        defaults = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4)
        return DinoVisionTransformer(
            patch_size=patch_size, num_register_tokens=num_register_tokens, **{**defaults, **kwargs}
        )

    build.__doc__ = doc
    return build


vit_small = _builder(*ARCH_SHAPES["vit_small"], "ViT-S: embed dim 384, 12 blocks, 6 heads.")
vit_base = _builder(*ARCH_SHAPES["vit_base"], "ViT-B: embed dim 768, 12 blocks, 12 heads.")
vit_large = _builder(*ARCH_SHAPES["vit_large"], "ViT-L: embed dim 1024, 24 blocks, 16 heads.")
vit_giant2 = _builder(*ARCH_SHAPES["vit_giant2"],
                      "Close to ViT-giant, with embed dim 1536 and 24 heads => 64 per head; 40 blocks.")
for _name in Arch.values():
    globals()[_name].__name__ = globals()[_name].__qualname__ = _name


ARCHITECTURES = {"vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large, "vit_giant2": vit_giant2}


def build_vit(arch: str, **kwargs) -> DinoVisionTransformer:
    """Builder by name, with a clear error for an unknown architecture."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)
