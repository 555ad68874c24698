"""Backbone entry points with the official ``torch.hub`` names and signatures."""

from __future__ import annotations

from torch import nn

from dinov2.hub.description import BackboneDescription, conflicts
from dinov2.hub.filters import flat_block_keys
from dinov2.hub.weights import Weights, load_exact, load_weights, resolve_backbone_weights
from dinov2.models.vision_transformer import DinoVisionTransformer, build_vit

# The released models' architecture; a self-describing file (dinov2-export) replaces all of it.
_RELEASED = dict(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", num_register_tokens=0,
                 interpolate_antialias=False, interpolate_offset=0.1)
REGISTER_KWARGS = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)  # the *_reg models


def released_kwargs(arch_name: str, registers: bool = False) -> dict:
    """``build_vit`` keyword arguments of a released model: ViT-g/14 uses the fused SwiGLU, the ``*_reg``
    models 4 register tokens and antialiased position-embedding resampling without offset."""
    swiglu = {"ffn_layer": "swiglufused"} if arch_name == "vit_giant2" else {}
    return {**_RELEASED, **swiglu, **(REGISTER_KWARGS if registers else {})}


def _make_dinov2_model(
    *,
    arch_name: str = "vit_large",
    registers: bool = False,
    pretrained: bool = True,
    weights: Weights | str = Weights.LVD142M,
    **kwargs,
) -> DinoVisionTransformer:
    """Build ``arch_name`` (the released model, with registers or not; ``kwargs`` override) and load
    ``weights``. A file written by ``dinov2-export`` describes its own architecture: it is built as the file
    says (the entry point's released defaults do not apply), and an architecture keyword given here that
    contradicts the file is an error naming it. Chunked block keys (official training checkpoints,
    ``blocks.{chunk}.{i}``) are read as the flat ``blocks.{i}``."""
    defaults = released_kwargs(arch_name, registers)
    if not pretrained:
        return build_vit(arch_name, **{**defaults, **kwargs})
    location = resolve_backbone_weights(weights, arch_name, kwargs.get("patch_size", defaults["patch_size"]),
                                        kwargs.get("num_register_tokens", defaults["num_register_tokens"]))
    loaded = load_weights(location)
    if loaded.description is None:
        model = build_vit(arch_name, **{**defaults, **kwargs})
    else:
        model = build_described(loaded.description, location, arch_name=arch_name, **kwargs)
    load_exact(model, flat_block_keys(loaded.state_dict), location)
    return model


def build_described(description: BackboneDescription, source: str, *, arch_name: str | None = None,
                    **kwargs) -> DinoVisionTransformer:
    """A randomly initialised backbone of the described architecture; ``kwargs`` may add what a
    description does not fix (``attention_backend``, ``drop_path_rate``, ...), not contradict it."""
    if arch_name is not None and arch_name != description.arch:
        raise ValueError(
            f"{source} holds a {description.arch} backbone, not {arch_name}: load it with dinov2_backbone"
            f"(weights=...) or the {description.arch} entry point")
    wrong = conflicts(description, kwargs)
    if wrong:
        raise ValueError(f"{source} describes its architecture itself; these arguments contradict it: "
                         f"{', '.join(wrong)} (leave them out)")
    return build_vit(description.arch, **{**description.builder_kwargs(), **kwargs})


def load_described(weights, *, pretrained: bool = True,
                   **kwargs) -> tuple[DinoVisionTransformer, BackboneDescription]:
    """(backbone, its description) from a file written by ``dinov2-export`` (a path or URL), in eval
    mode; ``pretrained=False`` gives the described architecture randomly initialised (a baseline)."""
    location = resolve_backbone_weights(weights, "vit_small", 14)
    loaded = load_weights(location)
    if loaded.description is None:
        raise ValueError(f"{location} does not describe its architecture (not written by dinov2-export "
                         "from a run with its config.yaml); load it with dinov2_vits14 / _vitb14 / ... and the "
                         "architecture keywords")
    model = build_described(loaded.description, location, **kwargs)
    if pretrained:
        load_exact(model, flat_block_keys(loaded.state_dict), location)
    return model.eval(), loaded.description


def dinov2_backbone(*, pretrained: bool = True, weights: str = "", **kwargs) -> DinoVisionTransformer:
    """Any backbone written by ``dinov2-export`` (the file describes its architecture and input):
    ``torch.hub.load(REPO, "dinov2_backbone", source="local", weights="teacher.safetensors")``.
    ``pretrained=False`` gives the same architecture randomly initialised (a baseline)."""
    if not weights:
        raise ValueError("dinov2_backbone needs weights=FILE (a .pth or .safetensors written by dinov2-export)")
    return load_described(weights, pretrained=pretrained, **kwargs)[0]


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
    return _make_dinov2_model(arch_name="vit_giant2", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vits14_reg(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-S/14 model with registers (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_small", registers=True, pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitb14_reg(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-B/14 model with registers (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_base", registers=True, pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitl14_reg(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-L/14 model with registers (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_large", registers=True, pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitg14_reg(*, pretrained: bool = True, weights: Weights | str = Weights.LVD142M, **kwargs):
    """DINOv2 ViT-g/14 model with registers (optionally) pretrained on the LVD-142M dataset."""
    return _make_dinov2_model(arch_name="vit_giant2", registers=True, pretrained=pretrained, weights=weights, **kwargs)


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
