"""The ViT architecture a ``student`` config section describes, as ``build_vit`` keyword arguments.

Defined once for everything that rebuilds the trained backbone: the trainer's student and teacher
(``dinov2.train.ssl_meta_arch.build_backbone``, which adds the training-only settings: stochastic
depth, attention kernel, FSDP grouping) and the description written into every export
(``dinov2.hub.description.from_config``), so an exported file always rebuilds the model that was
trained. Standard library only.
"""

from __future__ import annotations

ARCH_SHAPES = {  # (embed_dim, depth, num_heads) of each named architecture
    "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16), "vit_giant2": (1536, 40, 24),
}
ARCH_FIELDS = (  # the build_vit keyword arguments that fix the architecture (and the weights' shapes)
    "embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans", "mlp_ratio", "ffn_layer",
    "num_register_tokens", "init_values", "qkv_bias", "proj_bias", "ffn_bias", "interpolate_offset",
    "interpolate_antialias",
)
MLP_RATIO = 4.0  # every DINOv2 architecture; not a config key


def _value(choice) -> str:
    """A config enum member (or a plain string) as its string value."""
    return str(getattr(choice, "value", choice))


def backbone_kwargs(student_cfg, img_size: int) -> dict:
    """``build_vit(student_cfg.arch, **backbone_kwargs(student_cfg, img_size))`` builds the architecture of a
    ``student`` config section (keys :data:`ARCH_FIELDS`), with its position embedding for ``img_size``-pixel
    images. Width, depth and head count are the architecture's unless the section overrides them;
    ``student.layerscale = 0`` means no LayerScale (``init_values=None``)."""
    arch = _value(student_cfg.arch)
    if arch not in ARCH_SHAPES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_SHAPES)}")
    embed_dim, depth, num_heads = (getattr(student_cfg, key) if getattr(student_cfg, key) is not None else default
                                   for key, default in zip(("embed_dim", "depth", "num_heads"), ARCH_SHAPES[arch]))
    return dict(
        embed_dim=int(embed_dim), depth=int(depth), num_heads=int(num_heads), patch_size=int(student_cfg.patch_size),
        img_size=int(img_size), in_chans=int(student_cfg.in_chans), mlp_ratio=MLP_RATIO,
        ffn_layer=_value(student_cfg.ffn_layer), num_register_tokens=int(student_cfg.num_register_tokens),
        init_values=float(student_cfg.layerscale) or None, qkv_bias=bool(student_cfg.qkv_bias),
        proj_bias=bool(student_cfg.proj_bias), ffn_bias=bool(student_cfg.ffn_bias),
        interpolate_offset=float(student_cfg.interpolate_offset),
        interpolate_antialias=bool(student_cfg.interpolate_antialias),
    )
