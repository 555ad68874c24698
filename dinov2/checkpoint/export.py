"""Export the trained backbone of a DCP checkpoint, described, in the formats people load.

    export_backbone(RUN, OUT, which="final", fmt=None)    the ``dinov2-export`` command (dinov2/cli/export.py)

RUN is a ``step_N`` directory, a ``checkpoints/`` directory or a run directory (the newest
complete checkpoint is used), or a file written by dinov2-export (to convert it to another
format). Only the backbone's tensors are read, in one process and without a process group,
whatever world size wrote the checkpoint (DCP reassembles the shards). Keys lose their
``model.teacher.backbone.`` prefix; chunked blocks (``blocks.{chunk}.{i}``, in checkpoints written
with ``student.block_chunks > 0`` before the models became flat) become ``blocks.{i}``
(``dinov2.hub.filters.flat_block_keys``): the released key layout. The run's ``config.yaml`` (found next to the
checkpoints) describes the backbone: architecture and input (``dinov2.hub.description``), checked
against the tensors and written into the file, so ``torch.hub.load(REPO, "dinov2_backbone",
source="local", weights=OUT)``, ``dinov2-eval --backbone-file OUT`` and ``dinov2-curate embed``
need no architecture or preprocessing flags. The hf, timm and onnx formats live in
``dinov2.export``.

The checkpoint is read without running code from it (``dinov2.checkpoint.metadata``). The output
is written to a temporary file (or directory) next to the target and renamed into place, so OUT
is either the previous output or the complete export, never a torn one. Every failure (no or a
corrupt checkpoint, a directory or unwritable target, a format's package missing) is an OSError,
ValueError, ImportError or CheckpointException with a message naming it (one line on stderr and exit
code 2 from the command).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dinov2.hub.description import DESCRIPTION_KEY, BackboneDescription, from_config
from dinov2.hub.filters import flat_block_keys
from dinov2.load_errors import describe

from .manager import CheckpointManager, _quiet
from .metadata import read_metadata, safe_load

FORMATS = {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors", ".onnx": "onnx"}  # output suffix -> format
ALL_FORMATS = ("pth", "safetensors", "hf", "timm", "onnx")
WHICH = ("final", "teacher", "student", "student_ema")  # final: the teacher, or student_ema after distillation
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
    if which not in WHICH[1:]:
        raise ValueError(f"which={which!r}: choose {', '.join(WHICH[1:])}")
    prefix = f"model.{which}.backbone."
    tensors = read_tensors(checkpoint, prefix)
    if not tensors:
        sections = sorted({".".join(k.split(".")[:3]) for k in read_metadata(checkpoint).state_dict_metadata})
        raise ValueError(f"{checkpoint} holds no {prefix}* tensors (it has: {', '.join(sections[:12])})")
    return flat_block_keys({key[len(prefix):]: value.contiguous() for key, value in tensors.items()})


def hub_entry(cfg) -> tuple[str, dict]:
    """The torch.hub entry point (named by architecture and registers) and its keyword arguments."""
    return hub_entry_of(from_config(cfg))


def hub_call(weights: str | Path) -> str:
    """The torch.hub.load line for a described export (the file says the rest)."""
    return f"torch.hub.load(REPO, 'dinov2_backbone', source='local', weights={str(weights)!r})"


def _run_config(checkpoint: Path):
    """The run's config.yaml (run/checkpoints/step_N -> run/config.yaml), or None."""
    from dinov2.configs import load_config

    candidate = checkpoint.parent.parent / "config.yaml"
    return load_config(candidate) if candidate.exists() else None


def check_described(state: dict[str, torch.Tensor], description: BackboneDescription, source: str) -> None:
    """Build the described backbone on the meta device (no memory) and require the exact keys and
    shapes; the error names the mismatching keys (e.g. the checkpoint of another architecture)."""
    from dinov2.hub.weights import load_exact
    from dinov2.models.vision_transformer import build_vit

    with torch.device("meta"):
        model = build_vit(description.arch, **description.builder_kwargs())
    with warnings.catch_warnings():  # loading into meta tensors is a no-op, which is all we need
        warnings.simplefilter("ignore")
        load_exact(model, state, source)


def check_against_config(state: dict[str, torch.Tensor], cfg, source: str) -> None:
    check_described(state, from_config(cfg), source)


def final_model(checkpoint: Path) -> str:
    """The backbone a run delivers: its EMA teacher, or the student's EMA of a distillation run."""
    keys = read_metadata(checkpoint).state_dict_metadata
    return "student_ema" if any(k.startswith("model.student_ema.backbone.") for k in keys) else "teacher"


def read_backbone(source: str | Path, which: str = "teacher") -> tuple[dict, BackboneDescription | None, str]:
    """(state dict in the released layout, its description or None, where it came from) for a training
    checkpoint (the ``which`` backbone, described by the run's config.yaml) or an exported file."""
    source = Path(source)
    if source.is_file():
        from dinov2.hub.weights import read_weights

        loaded = read_weights(str(source))
        return flat_block_keys(loaded.state_dict), loaded.description, str(source)
    checkpoint = resolve_checkpoint(source)
    if which == "final":
        which = final_model(checkpoint)
    cfg = _run_config(checkpoint)
    if which == "teacher" and cfg is not None and cfg.distillation.teacher:
        raise ValueError(f"{checkpoint} is a distillation run: its teacher is the frozen {cfg.distillation.teacher} "
                         "(export it from there); this run's model is --which student_ema (the default) or student")
    state = backbone_state_dict(checkpoint, which)
    description = None
    if cfg is not None:
        step = re.search(r"(\d+)$", checkpoint.name)
        description = from_config(cfg, source={"checkpoint": str(checkpoint.resolve()), "which": which,
                                               "step": int(step.group(1)) if step else None})
        check_described(state, description, str(checkpoint))
    return state, description, str(checkpoint)


def output_format(out: Path, fmt: str | None = None) -> str:
    """The format ``--format`` names or, without it, the output's suffix names; a format that cannot be
    written to ``out`` is an error saying what is supported."""
    suffix = out.suffix.lower()
    if fmt is not None and fmt not in ALL_FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(ALL_FORMATS)}")
    if fmt == "hf":
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file; --format hf writes a directory (config.json, model.safetensors)")
        return fmt
    if out.is_dir():
        raise ValueError(f"{out} is a directory; give the output file, e.g. {out / 'teacher.safetensors'} "
                         "(or --format hf for a Hugging Face directory)")
    if fmt == "timm":
        if suffix not in (".pth", ".pt", ".safetensors"):
            raise ValueError(f"{out}: --format timm writes .safetensors or .pth, not {suffix or '(no suffix)'!r}")
        return fmt
    if suffix not in FORMATS:
        raise ValueError(f"{out}: unsupported output format {suffix or '(no suffix)'!r}; dinov2-export writes "
                         f"{', '.join(FORMATS)} (by suffix), a directory with --format hf, or --format timm")
    if fmt is not None and fmt != FORMATS[suffix]:
        raise ValueError(f"{out}: --format {fmt} contradicts the suffix {suffix} (which means {FORMATS[suffix]})")
    return FORMATS[suffix]


def _open_temporary(out: Path, directory: bool = False) -> str:
    """An empty temporary file (or directory) next to ``out`` (same filesystem, so the final rename is
    atomic); fails early, before the checkpoint is read, where the target directory is not writable."""
    temporary = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            temporary.mkdir()
        else:
            temporary.open("xb").close()  # the usual permissions (umask), unlike tempfile's 0600
    except OSError as error:
        raise OSError(f"cannot write {out}: {error.strerror or error} ({out.parent})") from None
    return str(temporary)


def write_state_dict(state: dict[str, torch.Tensor], path: str, description: BackboneDescription | None,
                     fmt: str = "pth", metadata: dict[str, str] | None = None) -> None:
    """``.safetensors`` (the description in the header metadata) or a torch file (the description as the
    one ``str`` entry beside the tensors: ``torch.load(weights_only=True)`` reads it, runs nothing)."""
    text = {DESCRIPTION_KEY: description.to_json()} if description is not None else {}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path, metadata={**text, **(metadata or {})} or None)
    else:
        torch.save({**state, **text}, path)


def _fsync_tree(path: str) -> None:
    paths = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    for item in paths if os.path.isdir(path) else [path]:
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def _write(state, description, fmt: str, temporary: str, out: Path) -> dict:
    """Write ``fmt`` to ``temporary`` then rename it to ``out``; returns the format's loading hints."""
    hints = {}
    try:
        if fmt in ("pth", "safetensors"):
            write_state_dict(state, temporary, description, fmt)
        else:
            if description is None:
                raise ValueError(f"--format {fmt} needs the backbone's description: export from a run directory "
                                 "that has its config.yaml, or from a file written by dinov2-export")
            from dinov2.export import write_format

            hints = write_format(fmt, state, description, temporary, out)
        _fsync_tree(temporary)
        if os.path.isdir(temporary) and out.is_dir():
            shutil.rmtree(out)  # the old export goes only once the new one is complete
        os.replace(temporary, out)
    except (OSError, RuntimeError) as error:  # a full disk, a quota: torch reports it as RuntimeError
        raise OSError(f"cannot write {out}: {describe(error)}") from None
    return hints


def export_backbone(checkpoint: str | Path, out: str | Path, *, which: str = "final",
                    fmt: str | None = None) -> dict:
    """Write the backbone of ``checkpoint`` (or of an exported file) to ``out`` atomically; returns
    what was written and how to load it."""
    out = Path(out)
    fmt = output_format(out, fmt)
    temporary = _open_temporary(out, directory=fmt == "hf")
    try:
        if which == "final" and not Path(checkpoint).is_file():
            which = final_model(resolve_checkpoint(checkpoint))
        state, description, source = read_backbone(checkpoint, which)
        hints = _write(state, description, fmt, temporary, out)
    finally:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary)
        elif os.path.exists(temporary):
            os.unlink(temporary)
    return {
        "checkpoint": source, "out": str(out), "which": which, "format": fmt, "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "description": description.to_json() if description is not None else None,
        "hub": hub_call(out) if description is not None and fmt in ("pth", "safetensors") else None,
        "hub_entry": hub_entry_of(description) if description is not None else None,
        "load": hints.get("load"),
    }


def hub_entry_of(description: BackboneDescription) -> tuple[str, dict]:
    """The architecture's own torch.hub entry point and the keyword arguments it needs (for files
    read by code that ignores descriptions)."""
    kwargs = description.builder_kwargs()
    name = _HUB_PREFIX[description.arch] + ("_reg" if kwargs["num_register_tokens"] else "")
    if description.arch == "vit_giant2":
        kwargs.pop("ffn_layer")  # the vitg entry points fix the FFN themselves
    return name, kwargs

