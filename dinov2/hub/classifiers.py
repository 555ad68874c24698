"""Linear-classifier entry points (``*_lc``): a backbone plus the released ImageNet-1k linear head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinov2.hub.backbones import _make_dinov2_model
from dinov2.hub.weights import (
    ClassifierWeights, Weights, linear_head_url, load_exact, load_state_dict_from, resolve_weights,
)


class _LinearClassifierWrapper(nn.Module):
    """Class token(s) of the last ``layers`` blocks + mean patch token -> ``linear_head``."""

    def __init__(self, *, backbone: nn.Module, linear_head: nn.Module, layers: int = 4) -> None:
        super().__init__()
        if layers not in (1, 4):
            raise ValueError(f"layers must be 1 or 4 (the released heads), got {layers}")
        self.backbone = backbone
        self.linear_head = linear_head
        self.layers = layers

    def forward(self, x: Tensor) -> Tensor:
        if self.layers == 1:
            features = self.backbone.forward_features(x)
            cls_token, patch_tokens = features["x_norm_clstoken"], features["x_norm_patchtokens"]
            linear_input = torch.cat([cls_token, patch_tokens.mean(dim=1)], dim=1)
        else:
            outs = self.backbone.get_intermediate_layers(x, n=4, return_class_token=True)
            linear_input = torch.cat([outs[0][1], outs[1][1], outs[2][1], outs[3][1], outs[3][0].mean(dim=1)], dim=1)
        return self.linear_head(linear_input)


def _make_dinov2_linear_classifier(
    *,
    arch_name: str = "vit_large",
    registers: bool = False,
    layers: int = 4,
    pretrained: bool = True,
    weights: ClassifierWeights | str = ClassifierWeights.IMAGENET1K,
    backbone_weights: Weights | str = Weights.LVD142M,
    **kwargs,
) -> _LinearClassifierWrapper:
    """``weights`` are the head's; ``backbone_weights`` (ours, optional) the backbone's, built as the released
    model (``registers``: a ``*_reg`` one) with ``kwargs`` overriding."""
    backbone = _make_dinov2_model(arch_name=arch_name, registers=registers, pretrained=pretrained,
                                  weights=backbone_weights, **kwargs)
    if layers not in (1, 4):
        raise ValueError(f"layers must be 1 or 4 (the released heads), got {layers}")
    linear_head = nn.Linear((1 + layers) * backbone.embed_dim, 1_000)
    if pretrained:
        url = linear_head_url(arch_name, backbone.patch_size, layers, backbone.num_register_tokens)
        location = resolve_weights(weights, ClassifierWeights, url)
        load_exact(linear_head, load_state_dict_from(location), location)
    return _LinearClassifierWrapper(backbone=backbone, linear_head=linear_head, layers=layers)


def _lc(arch_name: str, registers: bool):
    def entry(*, layers: int = 4, pretrained: bool = True, weights=ClassifierWeights.IMAGENET1K, **kwargs):
        return _make_dinov2_linear_classifier(
            arch_name=arch_name, registers=registers, layers=layers, pretrained=pretrained, weights=weights, **kwargs
        )

    return entry


dinov2_vits14_lc = _lc("vit_small", False)
dinov2_vitb14_lc = _lc("vit_base", False)
dinov2_vitl14_lc = _lc("vit_large", False)
dinov2_vitg14_lc = _lc("vit_giant2", False)
dinov2_vits14_reg_lc = _lc("vit_small", True)
dinov2_vitb14_reg_lc = _lc("vit_base", True)
dinov2_vitl14_reg_lc = _lc("vit_large", True)
dinov2_vitg14_reg_lc = _lc("vit_giant2", True)
for _name, _fn in list(globals().items()):
    if _name.endswith("_lc") and callable(_fn):
        _fn.__name__ = _fn.__qualname__ = _name
        _fn.__doc__ = f"{_name[:-3]} backbone with the released ImageNet-1k linear head (layers=1 or 4)."
