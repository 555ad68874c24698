"""Resolve what the user names as a backbone into a ready nn.Module in eval mode.

Three ways in:
- a hub name (``dinov2_vits14``, ``dinov2_vitb14_reg``, ...) with optional ``weights``
  (``None`` = random init, ``"LVD142M"``, a local ``.pth`` / ``.safetensors`` or ``file://``
  URL), through ``dinov2.hub.backbones.load_backbone``;
- a backbone file. One written by ``dinov2-export`` describes itself
  (``dinov2.hub.description``): it is built as described, with no flags, and its input (image size,
  resize ratio, mean and std) becomes the evaluation's default. A plain released-layout state dict
  needs an architecture name: image size, patch size, input channels, register count, FFN type, MLP
  ratio and biases are read from the tensors; the width, depth and head count come from the
  architecture, or from ``embed_dim``/``depth``/``num_heads`` overrides exactly as in the trainer's
  ``student`` config (the head count cannot be read from the tensors). A value the user gives must
  agree with the file, and a file that does not fit fails with the offending keys and shapes named;
- a training run directory (or checkpoint): its teacher (or student) backbone, described by the
  run's config.
With ``random_init`` the described architecture is built with a seeded random initialisation and
no weights: the baseline any custom size needs.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from dinov2.configs.choices import Arch
from dinov2.hub.description import ARCH_SHAPES
from dinov2.hub.filters import flat_block_keys

ARCHS = Arch.values()  # defined once, in the config schema's enums


class BackboneError(ValueError):
    """A backbone spec that cannot be resolved (bad file, mismatched architecture, ...)."""


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
    if arch not in ARCHS:
        raise BackboneError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    sd = flat_block_keys(sd)  # official training checkpoints: blocks.{chunk}.{i} -> blocks.{i}
    cfg = infer_backbone_config(sd)
    for name, given in (("patch_size", patch_size), ("num_register_tokens", num_register_tokens)):
        if given is not None and given != cfg[name]:
            raise BackboneError(f"{source}: {name}={given} was given but the file has {name}={cfg[name]}")
    kwargs = {k: cfg[k] for k in ("patch_size", "img_size", "in_chans", "num_register_tokens", "ffn_layer",
                                  "mlp_ratio", "init_values", "qkv_bias", "proj_bias", "ffn_bias")}
    overrides = {k: v for k, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)) if v}
    kwargs.update(overrides)
    try:
        return build_and_load(arch, kwargs, sd, source)
    except ValueError as e:
        shape = f"{arch}" + (f" with {overrides}" if overrides else "")
        hint = "" if overrides else "; for a non-standard size give --embed-dim, --depth and --num-heads"
        width, blocks, _ = ARCH_SHAPES[arch]
        raise BackboneError(
            f"{source} does not match {shape} (file: embed_dim {cfg['embed_dim']}, {cfg['depth']} blocks; "
            f"model: embed_dim {kwargs.get('embed_dim', width)}, {kwargs.get('depth', blocks)} blocks){hint}: {e}"
        ) from e


def build_and_load(arch: str, kwargs: dict, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """``build_vit(arch, **kwargs)`` holding ``sd`` (strict: every key and shape), in eval mode. Built on
    the meta device and the file's tensors assigned: a random initialisation that is overwritten anyway
    costs seconds on a small CPU (and minutes for ViT-g). Features are computed in float32 whatever the
    file stores (use --autocast for speed)."""
    from dinov2.hub.weights import load_exact
    from dinov2.models.vision_transformer import build_vit

    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    try:
        with torch.device("meta"):
            model = build_vit(arch, **kwargs)
    except (RuntimeError, NotImplementedError):  # a builder step that needs real data
        model = build_vit(arch, **kwargs)
    with warnings.catch_warnings():  # key and shape check; the copy into meta tensors is a no-op
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        load_exact(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        # Something not in the state dict (a non-persistent buffer): build for real instead.
        model = build_vit(arch, **kwargs)
        load_exact(model, sd, source)
    return model.eval()


def random_backbone(description, seed: int = 0) -> nn.Module:
    """The described architecture with the model's own (seeded) random initialisation: a baseline."""
    from dinov2.models.vision_transformer import build_vit

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vit(description.arch, **description.builder_kwargs()).eval()


def resolve_backbone(**kwargs) -> nn.Module:
    """The model of :func:`resolve_described`."""
    return resolve_described(**kwargs)[0]


_FILE_FLAGS = ("arch", "patch_size", "num_register_tokens", "embed_dim", "depth", "num_heads")


def resolve_described(
    *,
    name: str | None = None,
    weights: str | None = None,
    backbone_file: str | None = None,
    run: str | None = None,
    which: str = "teacher",
    random_init: bool = False,
    arch: str | None = None,
    patch_size: int | None = None,
    num_register_tokens: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    device: str | torch.device = "cpu",
    **hub_kwargs,
):
    """(frozen model in eval mode on ``device``, its description or None) for one of ``name`` (hub
    entry, optional ``weights``; ``None`` = random init), ``backbone_file`` (described, or plain with
    ``arch``) or ``run`` (a training run or checkpoint directory; ``which`` backbone). ``random_init``
    keeps the file's or run's architecture and drops its weights (a seeded baseline)."""
    flags = dict(zip(_FILE_FLAGS, (arch, patch_size, num_register_tokens, embed_dim, depth, num_heads)))
    given = {k: v for k, v in flags.items() if v is not None}
    if sum(x is not None for x in (name, backbone_file, run)) != 1:
        raise BackboneError("give exactly one of a hub name (--backbone), a backbone file (--backbone-file) "
                            "or a training run (--run)")
    description = None
    if name is not None:
        if given:
            raise BackboneError("--arch/--patch-size/--num-register-tokens/--embed-dim/--depth/--num-heads go with "
                                "--backbone-file, not a hub name")
        model = _hub_model(name, weights, hub_kwargs)
    else:
        if weights is not None:
            raise BackboneError("--weights goes with a hub name; a backbone file or run already holds the weights "
                                "(--weights random there builds its architecture randomly initialised)")
        sd, description, source = _read_file_or_run(backbone_file, run, which)
        if description is not None:
            _check_flags_agree(description, given, source)
            model = random_backbone(description) if random_init else build_and_load(
                description.arch, description.builder_kwargs(), sd, source)
        else:
            if arch is None:
                raise BackboneError(f"{source} does not describe its architecture (not written by dinov2-export "
                                    "from a run with its config.yaml): give --arch (vit_small, vit_base, vit_large "
                                    "or vit_giant2)")
            model = build_from_state_dict(sd, arch, patch_size, num_register_tokens, embed_dim, depth, num_heads,
                                          source=source)
            if random_init:
                model = _reinitialised(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), description


def _hub_model(name: str, weights, hub_kwargs: dict) -> nn.Module:
    from dinov2.hub.backbones import load_backbone
    from dinov2.hub.weights import WeightsFileError

    try:
        return load_backbone(name, weights=weights, **hub_kwargs)
    except WeightsFileError as e:  # refused, corrupt or non-floating: the message names file and keys
        raise BackboneError(str(e)) from e
    except OSError as e:  # includes URLError: released weights need the network
        raise BackboneError(
            f"could not load weights {weights!r} for {name} ({e}); pass a local file with "
            "--weights PATH, or --weights random for a randomly initialised backbone"
        ) from e


def _read_file_or_run(backbone_file: str | None, run: str | None, which: str):
    """(state dict, description or None, source) of a weights file or of a run's checkpoint."""
    from dinov2.hub.weights import WeightsFileError, load_weights

    if backbone_file is not None:
        try:
            loaded = load_weights(backbone_file)
        except FileNotFoundError as e:
            raise BackboneError(f"backbone file not found: {backbone_file}") from e
        except WeightsFileError as e:
            raise BackboneError(str(e)) from e
        return loaded.state_dict, loaded.description, backbone_file
    from dinov2.checkpoint.export import read_backbone

    try:
        sd, description, source = read_backbone(run, which)
    except (FileNotFoundError, ValueError) as e:
        raise BackboneError(f"--run {run}: {e}") from e
    if description is None:
        raise BackboneError(f"--run {run}: no config.yaml beside its checkpoints, so its architecture is unknown; "
                            "export it with dinov2-export and pass --backbone-file with --arch")
    return sd, description, f"{source} ({which})"


def _check_flags_agree(description, given: dict, source: str) -> None:
    have = {"arch": description.arch, **description.builder_kwargs()}
    wrong = [f"--{k.replace('_', '-')} {v} (the file has {have[k]})" for k, v in given.items() if have[k] != v]
    if wrong:
        raise BackboneError(f"{source} describes its own architecture; {', '.join(wrong)} contradicts it "
                            "(leave the flags out)")


def _reinitialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with the model's own seeded random initialisation."""
    if not hasattr(model, "init_steps"):
        raise BackboneError(f"{type(model).__name__} cannot be re-initialised")
    from dinov2.layers.initialization import run_init_steps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        run_init_steps(model.init_steps())
    return model.eval()


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks in order, also when grouped in chunks (an official model built with
    ``block_chunks > 0``: ``BlockChunk`` containers padded with ``nn.Identity``)."""
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
