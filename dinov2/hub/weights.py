"""Where released weights live and how any ``weights=`` argument becomes a state dict.

``weights`` may be a released name (``"LVD142M"``, ``"IMAGENET1K"`` for linear heads), an
``http(s)://`` URL, a ``file://`` URL or a local path (``.pth``/``.pt`` or ``.safetensors``).
Only torch is imported at module level so that ``hubconf.py`` stays dependency-free.
"""

from __future__ import annotations

import os
from enum import Enum
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from torch import nn

from dinov2.checkpoint.keys import key_mismatches

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


class Weights(Enum):
    LVD142M = "LVD142M"


class ClassifierWeights(Enum):
    IMAGENET1K = "IMAGENET1K"


def make_model_name(arch_name: str, patch_size: int, num_register_tokens: int = 0) -> str:
    """``("vit_small", 14, 4)`` -> ``"dinov2_vits14_reg4"`` (the released naming)."""
    compact = arch_name.replace("_", "")[:4]
    suffix = f"_reg{num_register_tokens}" if num_register_tokens else ""
    return f"dinov2_{compact}{patch_size}{suffix}"


def backbone_url(arch_name: str, patch_size: int, num_register_tokens: int = 0) -> str:
    base = make_model_name(arch_name, patch_size)
    full = make_model_name(arch_name, patch_size, num_register_tokens)
    return f"{DINOV2_BASE_URL}/{base}/{full}_pretrain.pth"


def linear_head_url(arch_name: str, patch_size: int, layers: int, num_register_tokens: int = 0) -> str:
    base = make_model_name(arch_name, patch_size)
    full = make_model_name(arch_name, patch_size, num_register_tokens)
    layers_str = str(layers) if layers == 4 else ""
    return f"{DINOV2_BASE_URL}/{base}/{full}_linear{layers_str}_head.pth"


def _released_name(weights, names: type[Enum]) -> Enum | None:
    if isinstance(weights, names):
        return weights
    if isinstance(weights, Enum):
        raise ValueError(f"weights {weights} are not valid here; choose one of {[w.value for w in names]}")
    if isinstance(weights, str) and weights in names.__members__:
        return names[weights]
    return None


def resolve_weights(weights, names: type[Enum], released_url: str) -> str:
    """Return a URL or an existing local path for ``weights``; raise a clear error otherwise."""
    if _released_name(weights, names) is not None:
        return released_url
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a released name, a URL or a path, got {type(weights).__name__}")
    text = os.fspath(weights)
    scheme = urlparse(text).scheme
    if scheme in ("http", "https"):
        return text
    path = url2pathname(urlparse(text).path) if scheme == "file" else text
    if os.path.exists(path):
        return path
    valid = ", ".join(repr(w.value) for w in names)
    raise ValueError(f"unknown weights {text!r}: not a released name ({valid}), a URL, or an existing file")


def load_state_dict_from(location: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a URL (downloaded to the torch hub cache) or a local file."""
    if urlparse(location).scheme in ("http", "https"):
        return torch.hub.load_state_dict_from_url(location, map_location="cpu")
    if location.endswith(".safetensors"):
        from safetensors.torch import load_file  # optional dependency, only for this format

        return load_file(location, device="cpu")
    state_dict = torch.load(location, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{location} does not hold a state dict (found {type(state_dict).__name__})")
    return state_dict


def load_exact(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one error that lists every missing, unexpected or
    mis-shaped key (the usual cause: weights of another architecture or image size)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    problems = key_mismatches(expected, {k: v.shape for k, v in state_dict.items()})
    if problems:
        raise ValueError(f"weights from {source} do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)
