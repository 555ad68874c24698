"""timm format: a state dict in timm's own ``VisionTransformer`` key layout.

``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), **kwargs)``
(or ``model.load_state_dict`` on a model created with those arguments) loads it; timm's own
``checkpoint_filter_fn`` passes these keys through unchanged. :func:`dinov2_to_timm` is the
key mapping, a pure function in the style of timm's filter functions (it gives what timm's
``_convert_dinov2`` gives for the released layout): registers become ``reg_token`` with a
position-free class token (``no_embed_class``), ``mlp.w12``/``w3`` become ``mlp.fc1``/``fc2``
(timm's ``SwiGLUPacked``), ``mask_token`` is dropped.

Features equal ours at the training size. Created with ``dynamic_img_size=True`` (as
:func:`timm_model_args` does), timm resamples position embeddings by size with antialiased
bicubic: that is exactly our rule for the ``_reg`` models (offset 0, antialias) at every size,
and differs from the plain models' offset-0.1 rule off the training grid.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from dinov2.hub.description import DESCRIPTION_KEY, BackboneDescription

_TIMM_ARCH = {"vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_giant2": "vit_giant"}


def dinov2_to_timm(state_dict: dict[str, Tensor], num_register_tokens: int = 0) -> dict[str, Tensor]:
    """Released DINOv2 keys -> timm ``VisionTransformer`` keys (pure; inputs are not modified)."""
    out = {}
    for key, value in state_dict.items():
        if key == "mask_token":
            continue
        if num_register_tokens and key in ("cls_token", "pos_embed", "register_tokens"):
            continue
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    if num_register_tokens:  # no_embed_class: the class token carries its own position embedding
        out["cls_token"] = state_dict["cls_token"] + state_dict["pos_embed"][:, :1]
        out["pos_embed"] = state_dict["pos_embed"][:, 1:]
        out["reg_token"] = state_dict["register_tokens"]
    return out


def _swiglu_hidden(embed_dim: int, mlp_ratio: float) -> int:
    hidden = int(embed_dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def timm_model_args(description: BackboneDescription) -> tuple[str, dict, dict]:
    """(timm model name, JSON-ready keyword arguments, keyword arguments that are classes) for
    ``timm.create_model``; an architecture timm cannot express is an error naming the setting."""
    d = description
    if not d.ffn_bias:
        raise ValueError("timm's ViT has no switch for FFN biases; a backbone trained with student.ffn_bias=false "
                         "cannot be exported to timm")
    name = f"{_TIMM_ARCH[d.arch]}_patch14{'_reg4' if d.num_register_tokens else ''}_dinov2"
    kwargs = dict(img_size=d.img_size, patch_size=d.patch_size, in_chans=d.in_chans, embed_dim=d.embed_dim,
                  depth=d.depth, num_heads=d.num_heads, qkv_bias=d.qkv_bias,
                  # create_model drops None arguments (the name's 1e-5 would stay): 0 means no LayerScale
                  init_values=d.init_values or 0.0,
                  proj_bias=d.proj_bias, reg_tokens=d.num_register_tokens, no_embed_class=bool(d.num_register_tokens),
                  num_classes=0, dynamic_img_size=True, mlp_ratio=d.mlp_ratio)
    classes = {}
    if d.ffn_layer in ("swiglu", "swiglufused"):
        # timm's SwiGLUPacked takes the packed width (both halves) through mlp_ratio; +0.5 guards int().
        kwargs["mlp_ratio"] = (2 * _swiglu_hidden(d.embed_dim, d.mlp_ratio) + 0.5) / d.embed_dim
        classes = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
    elif d.ffn_layer == "identity":
        raise ValueError("ffn_layer=identity has no timm equivalent")
    return name, kwargs, classes


def create_timm_model(description: BackboneDescription, **overrides):
    """``timm.create_model`` with the arguments of :func:`timm_model_args` (classes resolved)."""
    import timm
    from timm.layers import SwiGLUPacked

    name, kwargs, classes = timm_model_args(description)
    resolved = {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU} if classes else {}
    return timm.create_model(name, **{**kwargs, **resolved, **overrides})


def load_call(description: BackboneDescription, path: str) -> str:
    name, kwargs, classes = timm_model_args(description)
    arguments = ", ".join([f"{k}={v!r}" for k, v in kwargs.items()] + [f"{k}={v}" for k, v in classes.items()])
    return (f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={path!r}), "
            f"{arguments})")


def write_timm(state_dict: dict[str, Tensor], description: BackboneDescription, path: str, fmt: str) -> None:
    """timm keys to ``path``: safetensors (description and timm arguments in the header) or a torch
    file of tensors only (timm's loaders expect nothing else)."""
    name, kwargs, classes = timm_model_args(description)
    state = {k: v.contiguous() for k, v in dinov2_to_timm(state_dict, description.num_register_tokens).items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt", DESCRIPTION_KEY: description.to_json(), "timm_model": name,
                    "timm_kwargs": json.dumps(kwargs), "timm_classes": json.dumps(classes)}
        save_file(state, path, metadata=metadata)
    else:
        torch.save(state, path)
