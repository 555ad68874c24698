"""Adapt a foreign backbone state dict to a model at load time (as timm's ``checkpoint_filter_fn``).

Released DINOv2 checkpoints, ``dinov2-export`` files and our models have flat ``blocks.{i}`` keys and
(the released ones) a position embedding for 518-pixel images; official training checkpoints group their
blocks in chunks (``block_chunks > 0``: ``blocks.{chunk}.{i}``, the global index kept), as did training
checkpoints of this project before its models became flat, and recipes train at 224 pixels.
:func:`backbone_filter_fn` adapts such weights to the model instead of requiring them to match:

* chunked block keys become flat (:func:`flat_block_keys`), by the global block index they keep;
* a position embedding of another grid is resampled to the model's grid with the model's own
  resampling (bicubic, its ``interpolate_offset`` / antialias): at its native size the model then
  computes exactly what the source model computed at that size;
* a feed-forward block of another kind (``mlp.fc1/fc2`` vs SwiGLU's ``mlp.w12/w3``) is an error that names the config key to set.

Anything else that does not fit (another width, depth, registers) is left for ``load_exact``,
which lists every mismatching key. Pure function of tensors and key names: works on meta tensors.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import Tensor, nn

from dinov2.models.pos_embed import resample_patch_pos_embed

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_FLAT = re.compile(r"^blocks\.(\d+)\.(.+)$")
POS_EMBED = "pos_embed"


class WeightsLayoutError(ValueError):
    """Weights of another feed-forward kind than the model's: the message names the key to set."""


def block_index(key: str) -> tuple[int, str] | None:
    """``(global block index, rest of the key)`` of a flat or chunked block key, else None."""
    match = _CHUNKED.match(key) or _FLAT.match(key)
    if match is None:
        return None
    return int(match.groups()[-2]), match.groups()[-1]


def flat_block_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with chunked block keys ``blocks.{chunk}.{i}.x`` renamed ``blocks.{i}.x`` (the released,
    flat layout); other keys unchanged, values not copied."""
    out = {}
    for key, value in state_dict.items():
        parsed = block_index(key)
        flat = key if parsed is None else f"blocks.{parsed[0]}.{parsed[1]}"
        if flat in out:
            raise ValueError(f"block keys {key!r} and another key both name {flat!r}: not one backbone's weights")
        out[flat] = value
    return out


def ffn_kind(keys) -> str | None:
    """``mlp`` (fc1/fc2), ``swiglu`` (w12/w3) or ``identity`` (no FFN weights) from block keys."""
    rests = {parsed[1] for parsed in map(block_index, keys) if parsed is not None}
    if not rests:
        return None
    if any(rest.startswith("mlp.fc1.") for rest in rests):
        return "mlp"
    if any(rest.startswith("mlp.w12.") for rest in rests):
        return "swiglu"
    return "identity"


def check_ffn(state_dict: Mapping[str, Tensor], model_state: Mapping[str, Tensor], *, source: str,
              ffn_key: str = "ffn_layer") -> None:
    """Raise :class:`WeightsLayoutError` naming ``ffn_key`` when the feed-forward blocks differ in kind
    (MLP vs SwiGLU; ``swiglu`` and ``swiglufused`` build the same fused-width SwiGLU, as officially)."""
    found, wanted = ffn_kind(state_dict), ffn_kind(model_state)
    if found is None or wanted is None:
        return
    if found != wanted:
        setting = {"mlp": "mlp", "swiglu": "swiglufused", "identity": "identity"}[found]
        example = {"mlp": "mlp.fc1/fc2", "swiglu": "mlp.w12/w3", "identity": "no mlp.*"}
        raise WeightsLayoutError(
            f"{source}: the weights' feed-forward blocks are {found} ({example[found]} keys) but the model is built "
            f"with {wanted} ({example[wanted]}): set {ffn_key}={setting} to load them"
        )


def resample_pos_embed(pos_embed: Tensor, target_shape, *, num_prefix_tokens: int = 1,
                       interpolate_offset: float = 0.1, antialias: bool = False) -> Tensor:
    """``[1, prefix + M*M, D]`` -> ``target_shape`` (``[1, prefix + N*N, D]``) by the model's resampling."""
    if tuple(pos_embed.shape) == tuple(target_shape):
        return pos_embed
    if pos_embed.shape[-1] != target_shape[-1]:
        return pos_embed  # another width: load_exact reports it
    side = math.isqrt(int(target_shape[1]) - num_prefix_tokens)
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    resized = resample_patch_pos_embed(patches, (side, side), interpolate_offset=interpolate_offset,
                                       antialias=antialias)
    return torch.cat((prefix.float(), resized), dim=1).to(pos_embed.dtype)


def backbone_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module, *, source: str = "weights",
                       ffn_key: str = "ffn_layer") -> dict[str, Tensor]:
    """``state_dict`` adapted to ``model`` (a ``DinoVisionTransformer``): flat block keys, the position
    embedding on the model's grid, and a clear error for another feed-forward kind."""
    model_state = model.state_dict()
    out = flat_block_keys(state_dict)
    check_ffn(out, model_state, source=source, ffn_key=ffn_key)
    if POS_EMBED in out and POS_EMBED in model_state:
        out[POS_EMBED] = resample_pos_embed(
            out[POS_EMBED], model_state[POS_EMBED].shape,
            interpolate_offset=getattr(model, "interpolate_offset", 0.1),
            antialias=getattr(model, "interpolate_antialias", False),
        )
    return out
