"""Backbone entry points with the official ``torch.hub`` names and signatures."""

from __future__ import annotations

from torch import nn

from dinov2.hub.weights import Weights, load_exact, load_state_dict_from, resolve_backbone_weights
from dinov2.models.vision_transformer import DinoVisionTransformer, build_vit


def _make_dinov2_model(
    *,
    arch_name: str = "vit_large",
    img_size: int = 518,
    patch_size: int = 14,
    init_values: float = 1.0,
    ffn_layer: str = "mlp",
    block_chunks: int = 0,
    num_register_tokens: int = 0,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    pretrained: bool = True,
    weights: Weights | str = Weights.LVD142M,
    **kwargs,
) -> DinoVisionTransformer:
    model = build_vit(
        arch_name, img_size=img_size, patch_size=patch_size, init_values=init_values, ffn_layer=ffn_layer,
        block_chunks=block_chunks, num_register_tokens=num_register_tokens,
        interpolate_antialias=interpolate_antialias, interpolate_offset=interpolate_offset, **kwargs,
    )
    if pretrained:
        location = resolve_backbone_weights(weights, arch_name, patch_size, num_register_tokens)
        load_exact(model, load_state_dict_from(location), location)
    return model


def dinov2_vits14(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-S/14 model (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_small", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitb14(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-B/14 model (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_base", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitl14(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-L/14 model (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_large", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitg14(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-g/14 model (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(
        arch_name="vit_giant2", ffn_layer="swiglufused", pretrained=pretrained, weights=weights, **kwargs
    )


_REG_KWARGS = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)


def dinov2_vits14_reg(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-S/14 model with registers (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_small", pretrained=pretrained, weights=weights, **{**_REG_KWARGS, **kwargs})


def dinov2_vitb14_reg(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-B/14 model with registers (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_base", pretrained=pretrained, weights=weights, **{**_REG_KWARGS, **kwargs})


def dinov2_vitl14_reg(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-L/14 model with registers (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_large", pretrained=pretrained, weights=weights, **{**_REG_KWARGS, **kwargs})


def dinov2_vitg14_reg(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-g/14 model with registers (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(
        arch_name="vit_giant2", ffn_layer="swiglufused", pretrained=pretrained, weights=weights,
        **{**_REG_KWARGS, **kwargs},
    )


BACKBONES = {
    fn.__name__: fn
    for fn in (
        dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14,
        dinov2_vits14_reg, dinov2_vitb14_reg, dinov2_vitl14_reg, dinov2_vitg14_reg,
    )
}


def load_backbone(name: str, weights: Weights | str | None = Weights.LVD142M, **kwargs) -> nn.Module:
    """Any hub backbone by name, in eval mode; ``weights=None`` gives a random initialisation."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if weights is None:
        model = BACKBONES[name](pretrained=False, **kwargs)
    else:
        model = BACKBONES[name](pretrained=True, weights=weights, **kwargs)
    return model.eval()
