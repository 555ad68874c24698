"""Export the trained backbone of a DCP checkpoint as a plain state dict in the released layout.

    dinov2-export runs/x OUT.pth [--which teacher|student]      (or OUT.safetensors)

CHECKPOINT is a ``step_N`` directory, a ``checkpoints/`` directory or a run directory (the
newest complete checkpoint is used). Only the backbone's tensors are read, in one process and
without a process group, whatever world size wrote the checkpoint (DCP reassembles the
shards). Keys lose their ``model.teacher.backbone.`` prefix, and chunked blocks
(``blocks.{chunk}.{i}``) become ``blocks.{i}``, which is the key layout of the released
checkpoints: the file loads with ``torch.hub.load(REPO, "dinov2_vits14", source="local",
weights=OUT, ...)`` and with ``dinov2.models.vision_transformer.vit_*``. When the run's
``config.yaml`` is found next to the checkpoints, the export is checked against the
architecture it describes and the keyword arguments to rebuild it are printed.

The checkpoint is read without running code from it (``dinov2.checkpoint.metadata``). The output
is written to a temporary file in the target directory and renamed into place, so OUT is either
the previous file or the complete export, never a torn one. Its format follows its suffix
(``.pth``/``.pt``: a torch state dict; ``.safetensors``); any other suffix is an error. Every
failure (no or a corrupt checkpoint, a directory or unwritable target) is one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .manager import CheckpointManager, _quiet
from .metadata import describe, read_metadata, safe_load

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.(.*)$")
FORMATS = {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors"}  # output suffix -> format
_HUB_PREFIX = {"vit_small": "dinov2_vits14", "vit_base": "dinov2_vitb14", "vit_large": "dinov2_vitl14",
               "vit_giant2": "dinov2_vitg14"}


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step_N`` directory as given, or the newest complete checkpoint under a run or checkpoints directory."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    for directory in (path / "checkpoints", path):
        latest = CheckpointManager(directory).checkpoints() if directory.is_dir() else []
        if latest:
            return latest[-1][1]
    raise FileNotFoundError(f"{path} is neither a complete DCP checkpoint nor a directory holding one")


def read_tensors(checkpoint: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor whose flattened key starts with ``prefix``, as plain full CPU tensors (keys keep
    the prefix). One process, no process group, any world size at save time."""
    metadata = read_metadata(checkpoint)
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if state:
        context = _quiet()
        try:
            safe_load(state, checkpoint, no_dist=True)
        finally:
            context.__exit__(None, None, None)
    return state


def backbone_state_dict(checkpoint: str | Path, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The ``which`` backbone of a training checkpoint, in the released key layout."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}: choose teacher or student")
    prefix = f"model.{which}.backbone."
    tensors = read_tensors(checkpoint, prefix)
    if not tensors:
        sections = sorted({".".join(k.split(".")[:3]) for k in read_metadata(checkpoint).state_dict_metadata})
        raise ValueError(f"{checkpoint} holds no {prefix}* tensors (it has: {', '.join(sections[:12])})")
    state = {}
    for key, value in tensors.items():
        key = key[len(prefix):]
        chunked = _CHUNKED_BLOCK.match(key)
        state[f"blocks.{chunked.group(1)}.{chunked.group(2)}" if chunked else key] = value.contiguous()
    return state


def builder_kwargs(cfg) -> dict:
    """Keyword arguments of ``vit_*`` (and of the hub entry points) that rebuild the trained backbone."""
    s = cfg.student
    kwargs = dict(
        patch_size=s.patch_size, img_size=cfg.crops.global_crops_size, init_values=s.layerscale, ffn_layer=s.ffn_layer,
        block_chunks=0, num_register_tokens=s.num_register_tokens, interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset, in_chans=s.in_chans, qkv_bias=s.qkv_bias, proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias,
    )
    for key in ("embed_dim", "depth", "num_heads"):
        if s[key] is not None:
            kwargs[key] = s[key]
    return kwargs


def hub_entry(cfg) -> tuple[str, dict]:
    """The torch.hub entry point (named by architecture and registers) and its keyword arguments."""
    kwargs = builder_kwargs(cfg)
    name = _HUB_PREFIX[cfg.student.arch] + ("_reg" if kwargs["num_register_tokens"] else "")
    if cfg.student.arch == "vit_giant2":
        kwargs.pop("ffn_layer")  # the vitg entry points fix the FFN themselves
    return name, kwargs


def hub_call(cfg, weights: str | Path) -> str:
    """The torch.hub.load line for an exported file."""
    name, kwargs = hub_entry(cfg)
    arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"torch.hub.load(REPO, {name!r}, source='local', weights={str(weights)!r}, {arguments})"


def _run_config(checkpoint: Path):
    """The run's config.yaml (run/checkpoints/step_N -> run/config.yaml), or None."""
    from dinov2.configs import load_config

    candidate = checkpoint.parent.parent / "config.yaml"
    return load_config(candidate) if candidate.exists() else None


def check_against_config(state: dict[str, torch.Tensor], cfg, source: str) -> None:
    """Build the configured backbone on the meta device (no memory) and require the exact keys and
    shapes; the error names the mismatching keys (e.g. the checkpoint of another architecture)."""
    from dinov2.hub.weights import load_exact
    from dinov2.models.vision_transformer import build_vit

    with torch.device("meta"):
        model = build_vit(cfg.student.arch, **builder_kwargs(cfg))
    with warnings.catch_warnings():  # loading into meta tensors is a no-op, which is all we need
        warnings.simplefilter("ignore")
        load_exact(model, state, source)


def output_format(out: Path, fmt: str | None = None) -> str:
    """The format the output's suffix names; an unsupported suffix, a directory or a ``--format``
    that contradicts the suffix is an error saying what is supported."""
    if out.is_dir():
        raise ValueError(f"{out} is a directory; give the output file, e.g. {out / 'teacher.pth'}")
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{out}: unsupported output format {suffix or '(no suffix)'!r}; dinov2-export writes "
                         f"{', '.join(FORMATS)} (a state dict in the released key layout, or safetensors)")
    if fmt is not None and fmt != FORMATS[suffix]:
        raise ValueError(f"{out}: --format {fmt} contradicts the suffix {suffix} (which means {FORMATS[suffix]})")
    return FORMATS[suffix]


def _open_temporary(out: Path) -> str:
    """An empty temporary file next to ``out`` (same filesystem, so the final rename is atomic);
    fails early, before the checkpoint is read, where the target directory is not writable."""
    temporary = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary.open("xb").close()  # the usual permissions (umask), unlike tempfile's 0600
    except OSError as error:
        raise OSError(f"cannot write {out}: {error.strerror or error} ({out.parent})") from None
    return str(temporary)


def _write(state: dict[str, torch.Tensor], fmt: str, temporary: str, out: Path) -> None:
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state, temporary)
        else:
            torch.save(state, temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, out)
    except (OSError, RuntimeError) as error:  # a full disk, a quota: torch reports it as RuntimeError
        raise OSError(f"cannot write {out}: {describe(error)}") from None


def export_backbone(checkpoint: str | Path, out: str | Path, *, which: str = "teacher",
                    fmt: str | None = None) -> dict:
    """Write the backbone of ``checkpoint`` to ``out`` atomically; returns what was written and how to load it."""
    out = Path(out)
    fmt = output_format(out, fmt)
    checkpoint = resolve_checkpoint(checkpoint)
    temporary = _open_temporary(out)
    try:
        state = backbone_state_dict(checkpoint, which)
        cfg = _run_config(checkpoint)
        if cfg is not None:
            check_against_config(state, cfg, str(checkpoint))
        _write(state, fmt, temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return {
        "checkpoint": str(checkpoint), "out": str(out), "which": which, "format": fmt, "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "hub": hub_call(cfg, out) if cfg is not None else None,
        "hub_entry": hub_entry(cfg) if cfg is not None else None,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dinov2-export", description="Export the teacher (or student) backbone of a training checkpoint as a "
        "plain state dict in the released DINOv2 key layout.",
        epilog="Example: dinov2-export runs/vitl14 vitl14_teacher.pth  (then torch.hub.load(..., weights=...))",
    )
    parser.add_argument("checkpoint", help="a step_N checkpoint directory, or a run / checkpoints directory (newest)")
    parser.add_argument("out", help="output file: .pth or .pt (torch state dict) or .safetensors; written atomically")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="the EMA teacher (default, what DINOv2 releases) or the student")
    parser.add_argument("--format", choices=("pth", "safetensors"), default=None,
                        help="optional; the output suffix decides, and this must agree with it")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = export_backbone(args.checkpoint, args.out, which=args.which, fmt=args.format)
    except (OSError, ValueError, CheckpointException) as error:  # one line, no traceback
        print(f"dinov2-export: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote {info['tensors']} tensors ({info['parameters'] / 1e6:.1f} M parameters) of the {info['which']} "
          f"backbone of {info['checkpoint']} to {info['out']}")
    if info["hub"]:
        print(f"load with: {info['hub']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
