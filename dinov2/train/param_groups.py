"""AdamW parameter groups of the DINOv2 recipe.

Each parameter gets an lr multiplier (layer-wise decay ``rate ** (depth + 1 - layer_id)``,
times ``patch_embed_lr_mult`` for the patch embedding), a weight-decay multiplier (0 for
biases, norms and LayerScale gammas) and a last-layer flag (its lr follows the frozen-at-start
schedule). Parameters with equal settings share one group.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from torch import nn

_EMBEDDING_PARAMS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, depth + 1 for everything after (norm, heads)."""
    if not name.startswith("backbone."):
        return depth + 1
    local = name[len("backbone."):]
    if local.split(".")[0] in _EMBEDDING_PARAMS:
        return 0
    if local.startswith("blocks."):
        return int(local.split(".")[1]) + 1  # blocks.{i}.... (the model's blocks are flat)
    return depth + 1


def param_settings(name: str, depth: int, layerwise_decay: float, patch_embed_lr_mult: float) -> dict:
    lr_multiplier = layerwise_decay ** (depth + 1 - layer_id(name, depth))
    if "patch_embed" in name:
        lr_multiplier *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
    return {
        "lr_multiplier": lr_multiplier,
        "wd_multiplier": 0.0 if no_decay else 1.0,
        "is_last_layer": "last_layer" in name,
    }


def build_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    depth: int,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
) -> list[dict]:
    """Fused groups: one per distinct (lr multiplier, wd multiplier, last-layer) triple."""
    groups: dict[tuple, dict] = defaultdict(lambda: {"params": []})
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        settings = param_settings(name, depth, layerwise_decay, patch_embed_lr_mult)
        group = groups[tuple(settings.values())]
        group.update(settings)
        group["params"].append(param)
    return list(groups.values())


def apply_schedule_to_groups(param_groups: list[dict], lr: float, last_layer_lr: float, weight_decay: float) -> None:
    for group in param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
