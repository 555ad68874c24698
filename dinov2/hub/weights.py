"""Where released weights live and how any ``weights=`` argument becomes a state dict.

``weights`` may be a released name (``"LVD142M"``, ``"IMAGENET1K"`` for linear heads), an
``http(s)://`` URL, a ``file://`` URL or a local path (``.pth``/``.pt`` or ``.safetensors``).
Every form is read without running code from the file: URLs are downloaded into the torch hub
cache, then, like local files, read as safetensors or with ``torch.load(weights_only=True)``. One
rule for what a weights file may hold: ``{name: floating-point tensor}`` (:func:`check_state_dict`),
plus, in files written by ``dinov2-export``, the backbone's description: one ``str`` entry under the
reserved key ``"dinov2_backbone"`` (in ``.safetensors``, the header metadata entry of that name),
parsed as JSON by :mod:`dinov2.hub.description` and never unpickled as anything else.
Only torch is imported at module level so that ``hubconf.py`` stays dependency-free.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from torch import nn

from dinov2.state_dicts import key_mismatches, listing
from dinov2.load_errors import describe, weights_only_refusal
from dinov2.hub.description import DESCRIPTION_KEY, BackboneDescription, DescriptionError

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
RELEASED_ARCHS = ("vit_small", "vit_base", "vit_large", "vit_giant2")


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


class WeightsFileError(ValueError):
    """A weights file that cannot be used: refused (it would run code), corrupt, or not a plain
    ``{name: floating-point tensor}`` state dict."""


def released_backbone_url(arch_name: str, patch_size: int, num_register_tokens: int = 0) -> str:
    """URL of the released LVD-142M backbone for this architecture; a clear error where none was released."""
    if arch_name not in RELEASED_ARCHS or patch_size != 14 or num_register_tokens not in (0, 4):
        raise ValueError(
            f"no released LVD142M weights for {arch_name} with patch size {patch_size} and {num_register_tokens} "
            f"register tokens: released are {', '.join(RELEASED_ARCHS)} with patch size 14 and 0 or 4 registers"
        )
    return backbone_url(arch_name, patch_size, num_register_tokens)


def resolve_backbone_weights(weights, arch_name: str, patch_size: int, num_register_tokens: int = 0) -> str:
    """``weights`` for a backbone (hub entry points and ``student.pretrained_weights`` alike): the
    released name (``"LVD142M"``) becomes the URL of that architecture's released file; a URL or
    an existing path is returned as :func:`resolve_weights` does."""
    if _released_name(weights, Weights) is not None:
        return released_backbone_url(arch_name, patch_size, num_register_tokens)
    return resolve_weights(weights, Weights, "")


def download_to_hub_cache(url: str, progress: bool = True) -> str:
    """Download ``url`` once into ``<torch hub dir>/checkpoints/`` (where
    ``torch.hub.load_state_dict_from_url`` keeps files, so either finds the other's downloads) and
    return the local path. ``download_url_to_file`` writes a temporary file and renames it."""
    directory = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(directory, exist_ok=True)
    filename = os.path.basename(urlparse(url).path)
    if not filename:
        raise WeightsFileError(f"{url}: the URL names no file")
    cached = os.path.join(directory, filename)
    if not os.path.exists(cached):
        sys.stderr.write(f'Downloading: "{url}" to {cached}\n')
        torch.hub.download_url_to_file(url, cached, progress=progress)
    return cached


def check_state_dict(state_dict, source: str) -> dict[str, torch.Tensor]:
    """The one rule for a weights file: a dict of floating-point tensors. Anything else is an error
    that names the offending keys (and dtypes): integer or boolean tensors are never cast silently."""
    if not isinstance(state_dict, dict):
        raise WeightsFileError(
            f"{source}: expected a plain state dict {{name: tensor}} (as written by dinov2-export), found a "
            f"{type(state_dict).__name__}"
        )
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsFileError(
            f"{source}: expected a plain state dict {{name: tensor}} (as written by dinov2-export), found non-tensor "
            f"entries {listing(not_tensors)}; a training checkpoint is exported with dinov2-export"
        )
    not_float = [f"{k} ({v.dtype})" for k, v in state_dict.items() if not v.is_floating_point()]
    if not_float:
        raise WeightsFileError(
            f"{source}: weights must be floating-point tensors, found {listing(not_float)}; "
            "non-floating tensors are not cast (they are not weights of this model)"
        )
    return state_dict


@dataclass(frozen=True)
class WeightsFile:
    """What a weights file holds: the state dict, and the backbone's description where the file has one."""

    state_dict: dict[str, torch.Tensor]
    description: BackboneDescription | None = None


def split_description(entries: dict, description_text, source: str) -> tuple[dict, BackboneDescription | None]:
    """The state dict without the reserved description entry, and that entry parsed. The entry must be
    a ``str`` (JSON); anything else under the key is refused like any other non-tensor entry."""
    if description_text is None:
        return entries, None
    if not isinstance(description_text, str):
        raise WeightsFileError(
            f"{source}: the reserved entry {DESCRIPTION_KEY!r} must be the JSON text written by dinov2-export, "
            f"found a {type(description_text).__name__}"
        )
    try:
        return entries, BackboneDescription.from_json(description_text, source)
    except DescriptionError as error:
        raise WeightsFileError(str(error)) from None


def _read_safetensors(path: str, source: str) -> tuple[dict, str | None]:
    from safetensors import safe_open  # optional dependency, only for this format
    from safetensors.torch import load_file

    try:
        state_dict = load_file(path, device="cpu")
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # SafetensorError and friends: a header or size that does not fit
        raise WeightsFileError(f"{source}: not a readable .safetensors file ({error})") from error
    return state_dict, metadata.get(DESCRIPTION_KEY)


def _read_torch(path: str, source: str) -> tuple[dict, str | None]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling, zip and EOF errors come in many types
        reason = weights_only_refusal(error)
        if reason is not None:
            raise WeightsFileError(
                f"{source}: refused to load: the file holds Python objects besides tensors ({reason}); weights are "
                "read with torch.load(weights_only=True), which runs no code from the file"
            ) from None
        raise WeightsFileError(f"{source}: not a readable torch weights file ({describe(error)})") from None
    if isinstance(state_dict, dict) and DESCRIPTION_KEY in state_dict:
        state_dict = dict(state_dict)
        return state_dict, state_dict.pop(DESCRIPTION_KEY)
    return state_dict, None


def read_weights(path: str, source: str | None = None) -> WeightsFile:
    """A local ``.safetensors`` or torch file (``torch.load(weights_only=True)``: no code from the
    file runs): its tensors, checked by :func:`check_state_dict`, and its description if it has one;
    ``source`` names it in errors (default: path)."""
    source = source or path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}" + (" (a directory)" if os.path.isdir(path) else ""))
    reader = _read_safetensors if path.endswith(".safetensors") else _read_torch
    entries, description_text = reader(path, source)
    state_dict, description = split_description(entries, description_text, source)
    return WeightsFile(check_state_dict(state_dict, source), description)


def read_weights_file(path: str, source: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of :func:`read_weights` (the description, if any, left out)."""
    return read_weights(path, source).state_dict


def load_weights(location: str) -> WeightsFile:
    """Tensors and description from an ``http(s)://`` URL (downloaded once to the torch hub cache), a
    ``file://`` URL or a path: ``.safetensors``, or a torch file read with ``weights_only=True``."""
    location = os.fspath(location)
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        cached = download_to_hub_cache(location)
        try:
            return read_weights(cached, f"{location} (downloaded to {cached})")
        except WeightsFileError:
            os.remove(cached)  # refused or corrupt: a fixed upload is downloaded afresh next time
            raise
    if parsed.scheme == "file":
        return read_weights(url2pathname(parsed.path))
    return read_weights(location)


def load_state_dict_from(location: str) -> dict[str, torch.Tensor]:
    """The state dict of :func:`load_weights` (any description left out)."""
    return load_weights(location).state_dict


def load_exact(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one error that lists every missing, unexpected or
    mis-shaped key (the usual cause: weights of another architecture or image size)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    problems = key_mismatches(expected, {k: v.shape for k, v in state_dict.items()})
    if problems:
        raise ValueError(f"weights from {source} do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)
