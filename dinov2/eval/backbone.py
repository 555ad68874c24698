"""Resolve what the user names as a backbone into a ready nn.Module in eval mode.

Two ways in (training checkpoints are wired by the trainer's owner):
- a hub name (``dinov2_vits14``, ``dinov2_vitb14_reg``, ...) with optional ``weights``
  (``None`` = random init, ``"LVD142M"``, a local ``.pth`` / ``.safetensors`` or ``file://``
  URL), through ``dinov2.hub.backbones.load_backbone``;
- a plain backbone state dict (``.pth`` / ``.safetensors``, released key layout, as written
  by ``dinov2-export``) plus an architecture name. Image size, patch size, input channels,
  register count, FFN type, MLP ratio and biases are read from the tensors; the width, depth
  and head count come from the architecture, or from ``embed_dim``/``depth``/``num_heads``
  overrides exactly as in the trainer's ``student`` config (the head count cannot be read
  from the tensors). A value the user gives must agree with the file, and a file that does
  not fit fails with the offending keys and shapes named.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from dinov2.configs.choices import Arch

ARCHS = Arch.values()  # defined once, in the config schema's enums


class BackboneError(ValueError):
    """A backbone spec that cannot be resolved (bad file, mismatched architecture, ...)."""


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A plain ``{name: floating tensor}`` dict from ``.safetensors`` or a torch file, read by the
    loader the hub and the trainer use (``weights_only=True``; a path or a URL)."""
    from dinov2.hub.weights import WeightsFileError, load_state_dict_from

    try:
        return load_state_dict_from(path)
    except FileNotFoundError as e:
        raise BackboneError(f"backbone file not found: {path}") from e
    except WeightsFileError as e:
        raise BackboneError(str(e)) from e


def unchunk_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blocks.{chunk}.{i}.x`` (official FSDP chunking, global index ``i``) -> ``blocks.{i}.x``."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit():
            k = ".".join(["blocks", *parts[2:]])
        out[k] = v
    return out


def infer_backbone_config(sd: dict[str, torch.Tensor]) -> dict:
    """Everything a released-layout state dict determines unambiguously (not the head count:
    ``qkv`` is ``[3D, D]`` for any number of heads)."""
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in sd:
            found = ", ".join(list(sd)[:6])
            raise BackboneError(f"state dict has no '{key}' (keys start: {found}); not a ViT backbone")
    proj = sd["patch_embed.proj.weight"]  # [D, C, p, p]
    patch_size = int(proj.shape[-1])
    num_patches = int(sd["pos_embed"].shape[1]) - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise BackboneError(f"pos_embed has {num_patches} patch positions, not a square grid")
    embed_dim = int(proj.shape[0])
    regs = sd.get("register_tokens")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    return {
        "embed_dim": embed_dim,
        "depth": len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
        "in_chans": int(proj.shape[1]),
        "patch_size": patch_size,
        "img_size": side * patch_size,
        "num_register_tokens": int(regs.shape[1]) if regs is not None else 0,
        "ffn_layer": "swiglufused" if swiglu else "mlp",
        # SwiGLU's hidden width is derived from the standard ratio 4; the strict load checks it.
        "mlp_ratio": fc1.shape[0] / embed_dim if fc1 is not None else 4.0,
        "init_values": 1.0 if "blocks.0.ls1.gamma" in sd else None,  # value irrelevant: gamma is loaded
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "ffn_bias": ("blocks.0.mlp.w12.bias" if swiglu else "blocks.0.mlp.fc1.bias") in sd,
    }


def build_from_state_dict(
    sd: dict[str, torch.Tensor],
    arch: str,
    patch_size: int | None = None,
    num_register_tokens: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    source: str = "state dict",
) -> nn.Module:
    """Build ``arch`` (with the trainer's optional ``embed_dim``/``depth``/``num_heads``
    overrides) shaped like ``sd`` and load it strictly."""
    from dinov2.hub.weights import load_exact
    from dinov2.models.vision_transformer import build_vit

    if arch not in ARCHS:
        raise BackboneError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    sd = unchunk_keys(sd)
    cfg = infer_backbone_config(sd)
    for name, given in (("patch_size", patch_size), ("num_register_tokens", num_register_tokens)):
        if given is not None and given != cfg[name]:
            raise BackboneError(f"{source}: {name}={given} was given but the file has {name}={cfg[name]}")
    kwargs = {k: cfg[k] for k in ("patch_size", "img_size", "in_chans", "num_register_tokens", "ffn_layer",
                                  "mlp_ratio", "init_values", "qkv_bias", "proj_bias", "ffn_bias")}
    kwargs["block_chunks"] = 0
    overrides = {k: v for k, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)) if v}
    kwargs.update(overrides)
    # Features are computed in float32 whatever the file stores (use --autocast for speed).
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    # Build on the meta device: a random initialisation that is overwritten anyway costs
    # seconds on a small CPU (and minutes for ViT-g); the file's tensors are assigned instead.
    try:
        with torch.device("meta"):
            model = build_vit(arch, **kwargs)
    except (RuntimeError, NotImplementedError):  # a builder step that needs real data
        model = build_vit(arch, **kwargs)
    try:
        with warnings.catch_warnings():  # key and shape check; the copy into meta tensors is a no-op
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            load_exact(model, sd, source)
    except ValueError as e:
        shape = f"{arch}" + (f" with {overrides}" if overrides else "")
        hint = "" if overrides else "; for a non-standard size give --embed-dim, --depth and --num-heads"
        raise BackboneError(
            f"{source} does not match {shape} (file: embed_dim {cfg['embed_dim']}, {cfg['depth']} blocks; "
            f"model: embed_dim {model.embed_dim}, {len(blocks_of(model))} blocks){hint}: {e}"
        ) from e
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        # Something not in the state dict (a non-persistent buffer): build for real instead.
        model = build_vit(arch, **kwargs)
        load_exact(model, sd, source)
    return model.eval()


def resolve_backbone(
    *,
    name: str | None = None,
    weights: str | None = None,
    backbone_file: str | None = None,
    arch: str | None = None,
    patch_size: int | None = None,
    num_register_tokens: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    device: str | torch.device = "cpu",
    **hub_kwargs,
) -> nn.Module:
    """One of ``name`` (hub entry, optional ``weights``; ``None`` = random init) or
    ``backbone_file`` + ``arch``. Returns a frozen model in eval mode on ``device``."""
    if (name is None) == (backbone_file is None):
        raise BackboneError("give exactly one of a hub name (--backbone) or a state-dict file (--backbone-file)")
    if name is not None:
        file_only = (arch, patch_size, num_register_tokens, embed_dim, depth, num_heads)
        if any(v is not None for v in file_only):
            raise BackboneError(
                "--arch/--patch-size/--num-register-tokens/--embed-dim/--depth/--num-heads go with "
                "--backbone-file, not a hub name"
            )
        from dinov2.hub.backbones import load_backbone
        from dinov2.hub.weights import WeightsFileError

        try:
            model = load_backbone(name, weights=weights, **hub_kwargs)
        except WeightsFileError as e:  # refused, corrupt or non-floating: the message names file and keys
            raise BackboneError(str(e)) from e
        except OSError as e:  # includes URLError: released weights need the network
            raise BackboneError(
                f"could not load weights {weights!r} for {name} ({e}); pass a local file with "
                "--weights PATH, or --weights random for a randomly initialised backbone"
            ) from e
    else:
        if weights is not None:
            raise BackboneError("--weights goes with a hub name; --backbone-file already holds the weights")
        if arch is None:
            raise BackboneError("--backbone-file needs --arch (vit_small, vit_base, vit_large or vit_giant2)")
        sd = load_state_dict_file(backbone_file)
        model = build_from_state_dict(sd, arch, patch_size, num_register_tokens, embed_dim, depth, num_heads,
                                      source=backbone_file)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks in order, also when grouped in chunks (``blocks.{chunk}.{i}``)."""
    if hasattr(model, "block_list"):
        return list(model.block_list())
    out = []
    for b in model.blocks:
        if isinstance(b, nn.ModuleList):
            out.extend(x for x in b if not isinstance(x, nn.Identity))
        else:
            out.append(b)
    return out


def model_in_chans(model: nn.Module) -> int:
    """Input channels the backbone expects (3 unless its patch embedding says otherwise)."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return int(getattr(proj, "in_channels", 3))
