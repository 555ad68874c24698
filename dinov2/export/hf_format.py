"""Hugging Face format: a directory that ``transformers.AutoModel.from_pretrained`` loads as
``Dinov2Model`` (or ``Dinov2WithRegistersModel`` with registers).

Written without transformers: ``config.json``, ``model.safetensors`` in the key layout of the
checkpoints on the Hugging Face Hub (which transformers 4.x loads as is and 5.x renames on load),
and, for RGB backbones, ``preprocessor_config.json`` (``BitImageProcessor``: resize, center crop
and normalise as the description says). :func:`dinov2_to_hf` is the key mapping, a pure function:
``qkv`` splits into query/key/value, SwiGLU's ``w12``/``w3`` become ``weights_in``/``weights_out``,
LayerScale becomes ``lambda1`` (ones where the backbone has none).

Position embeddings: transformers resamples them by target size with plain bicubic
(``Dinov2Model``) or antialiased bicubic (``Dinov2WithRegistersModel``), never with the official
0.1 offset, and leaves them unchanged at the training grid. Hence features equal ours:
- at the training size, always;
- at every size for a backbone with ``interpolate_offset=0`` and the antialiasing that its class
  uses (no antialias without registers; antialias with registers, as the released ``_reg``
  models);
- off the training grid they differ for the plain released recipe (offset 0.1), by about 1e-3.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from dinov2.hub.description import DESCRIPTION_KEY, BackboneDescription


def dinov2_to_hf(state_dict: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Released DINOv2 keys -> Hugging Face Hub ``Dinov2Model`` keys (pure)."""
    out = {
        "embeddings.cls_token": state_dict["cls_token"],
        "embeddings.mask_token": state_dict["mask_token"],
        "embeddings.position_embeddings": state_dict["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state_dict["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state_dict["patch_embed.proj.bias"],
        "layernorm.weight": state_dict["norm.weight"],
        "layernorm.bias": state_dict["norm.bias"],
    }
    if "register_tokens" in state_dict:
        out["embeddings.register_tokens"] = state_dict["register_tokens"]
    dim = state_dict["cls_token"].shape[-1]
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for name in ("norm1", "norm2"):
            out[f"{dst}{name}.weight"] = state_dict[f"{src}{name}.weight"]
            out[f"{dst}{name}.bias"] = state_dict[f"{src}{name}.bias"]
        for part, piece in zip(("query", "key", "value"), state_dict[f"{src}attn.qkv.weight"].chunk(3)):
            out[f"{dst}attention.attention.{part}.weight"] = piece
        if f"{src}attn.qkv.bias" in state_dict:
            for part, piece in zip(("query", "key", "value"), state_dict[f"{src}attn.qkv.bias"].chunk(3)):
                out[f"{dst}attention.attention.{part}.bias"] = piece
        out[f"{dst}attention.output.dense.weight"] = state_dict[f"{src}attn.proj.weight"]
        out[f"{dst}attention.output.dense.bias"] = state_dict[f"{src}attn.proj.bias"]
        for j in (1, 2):
            gamma = state_dict.get(f"{src}ls{j}.gamma")
            out[f"{dst}layer_scale{j}.lambda1"] = gamma if gamma is not None else torch.ones(dim)
        mlp = {"fc1": "fc1", "fc2": "fc2"} if f"{src}mlp.fc1.weight" in state_dict else {"w12": "weights_in",
                                                                                         "w3": "weights_out"}
        for ours, theirs in mlp.items():
            for kind in ("weight", "bias"):
                out[f"{dst}mlp.{theirs}.{kind}"] = state_dict[f"{src}mlp.{ours}.{kind}"]
    return out


def hf_config(description: BackboneDescription) -> dict:
    """``config.json`` of the equivalent transformers model; what it cannot express is an error."""
    d = description
    if not (d.proj_bias and d.ffn_bias):
        raise ValueError("transformers' Dinov2Model always has attention-output and FFN biases; a backbone trained "
                         "with student.proj_bias or student.ffn_bias false cannot be exported to hf")
    if d.ffn_layer == "identity":
        raise ValueError("ffn_layer=identity has no transformers equivalent")
    registers = d.num_register_tokens > 0
    config = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": d.embed_dim, "num_hidden_layers": d.depth, "num_attention_heads": d.num_heads,
        "mlp_ratio": int(d.mlp_ratio) if float(d.mlp_ratio).is_integer() else d.mlp_ratio,
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": d.img_size, "patch_size": d.patch_size,
        "num_channels": d.in_chans, "qkv_bias": d.qkv_bias, "layerscale_value": d.init_values or 1.0,
        "use_swiglu_ffn": d.ffn_layer in ("swiglu", "swiglufused"), "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0, "torch_dtype": "float32",
        DESCRIPTION_KEY: json.loads(description.to_json()),
    }
    if registers:
        config["num_register_tokens"] = d.num_register_tokens
    return config


def preprocessor_config(description: BackboneDescription) -> dict:
    d = description
    return {
        "image_processor_type": "BitImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": int(round(d.img_size * d.resize_ratio))}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": d.img_size, "width": d.img_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(d.mean), "image_std": list(d.std),
    }


def write_hf(state_dict: dict[str, Tensor], description: BackboneDescription, directory: str) -> None:
    from safetensors.torch import save_file

    config = hf_config(description)
    tensors = {k: v.contiguous() for k, v in dinov2_to_hf(state_dict, description.depth).items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    if description.in_chans == 3:
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as handle:
            json.dump(preprocessor_config(description), handle, indent=2)


def load_call(path: str) -> str:
    return f"transformers.AutoModel.from_pretrained({path!r})"
