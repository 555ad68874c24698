"""Backbone export formats besides our own state dict: Hugging Face transformers, timm and ONNX.

One module per format, each with a pure key-mapping (filter) function and a writer; the
``dinov2-export`` command (``dinov2.checkpoint.export``) reads the checkpoint and its description,
then calls :func:`write_format`. Each format's package is needed only to load (and, for ONNX, to
write) its output: a missing one is a clear ImportError naming the package.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from dinov2.hub.description import BackboneDescription

PACKAGES = {"hf": None, "timm": None, "onnx": ("onnx", "onnxscript")}  # needed to write


def _require(fmt: str) -> None:
    import importlib.util

    missing = [name for name in PACKAGES[fmt] or () if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"--format {fmt} needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}")


def write_format(fmt: str, state_dict: dict[str, Tensor], description: BackboneDescription, temporary: str,
                 out: Path) -> dict:
    """Write ``fmt`` to ``temporary`` (a directory for hf, a file otherwise); returns ``{"load": code}``."""
    _require(fmt)
    if fmt == "hf":
        from .hf_format import load_call, write_hf

        write_hf(state_dict, description, temporary)
        return {"load": load_call(str(out))}
    if fmt == "timm":
        from .timm_format import load_call, write_timm

        write_timm(state_dict, description, temporary, "safetensors" if out.suffix == ".safetensors" else "pth")
        return {"load": load_call(description, str(out))}
    if fmt == "onnx":
        from dinov2.hub.weights import load_exact
        from dinov2.models.vision_transformer import build_vit

        from .onnx_format import output_names, write_onnx

        model = build_vit(description.arch, **description.builder_kwargs())
        load_exact(model, state_dict, str(out))
        write_onnx(model, description, temporary)
        return {"load": f"onnxruntime.InferenceSession({str(out)!r}).run({output_names(description)}, "
                        "{'pixel_values': images})"}
    raise ValueError(f"unknown export format {fmt!r}")
