"""Transformer building blocks with the key names of the released DINOv2 checkpoints."""

from .attention import Attention
from .attention_backends import BACKENDS as ATTENTION_BACKENDS
from .block import Block
from .dino_head import DINOHead
from .layer_scale import LayerScale
from .mlp import Mlp
from .packing import PackLayout, pack
from .patch_embed import PatchEmbed
from .swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused

# Official alias: the memory-efficient attention is the same module here; the kernel is a backend.
MemEffAttention = Attention
NestedTensorBlock = Block

__all__ = [
    "ATTENTION_BACKENDS", "Attention", "Block", "DINOHead", "LayerScale", "MemEffAttention",
    "Mlp", "NestedTensorBlock", "PackLayout", "PatchEmbed", "SwiGLUFFN", "SwiGLUFFNFused", "pack",
]
