"""ONNX export of a backbone: dynamic batch and image size, features equal under onnxruntime.

The graph takes ``pixel_values [B, C, H, W]`` (normalised as the description says; H and W
multiples of the patch size) and returns ``cls_token [B, D]``, ``patch_tokens [B, H/p * W/p, D]``
and, for models with registers, ``register_tokens [B, R, D]``: the normalised outputs of
``forward_features``. Position embeddings are resampled inside the graph for any H and W with
the model's own bicubic rule (offset, antialiasing; ``dinov2.export.pos_embed``), so the
exported model is not tied to the size it was exported at. Exported with ``torch.onnx.export``
(the ``torch.export``-based exporter, which needs ``onnxscript``); the description goes into the
model's metadata (``metadata_props``).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.hub.description import DESCRIPTION_KEY, BackboneDescription

from .pos_embed import resample_for_export

OPSET = 18


def dense_block(block: nn.Module, x: Tensor) -> Tensor:
    """One transformer block on a dense ``[B, N, D]`` batch (inference: no drop path), with the block's
    own layers and one ``scaled_dot_product_attention``: the model's packed path fixes the batch and
    token counts as Python integers, which an exported graph must not."""
    attn = block.attn
    batch, tokens, dim = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=attn.scale)
    x = x + block.ls1(attn.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))
    return x + block.ls2(block.mlp(block.norm2(x)))


class OnnxBackbone(nn.Module):
    """``forward_features`` of a DINOv2 backbone with export-friendly position embeddings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        patches = m.patch_embed(pixel_values)
        grid_h = pixel_values.shape[-2] // m.patch_size
        grid_w = pixel_values.shape[-1] // m.patch_size
        patch_pos = resample_for_export(m.pos_embed[:, 1:], grid_h, grid_w,
                                        interpolate_offset=m.interpolate_offset, antialias=m.interpolate_antialias)
        cls = m.cls_token + m.pos_embed[:, :1]
        tokens = [cls.expand(patches.shape[0], -1, -1)]
        if m.register_tokens is not None:
            tokens.append(m.register_tokens.expand(patches.shape[0], -1, -1))
        tokens.append(patches + patch_pos.to(patches.dtype))
        x = torch.cat(tokens, dim=1)
        for block in m.blocks:
            x = dense_block(block, x)
        normed = m.norm(x)
        r = m.num_register_tokens
        outputs = (normed[:, 0], normed[:, r + 1:])
        return outputs + (normed[:, 1:r + 1],) if r else outputs


def output_names(description: BackboneDescription) -> list[str]:
    return ["cls_token", "patch_tokens"] + (["register_tokens"] if description.num_register_tokens else [])


def write_onnx(model: nn.Module, description: BackboneDescription, path: str) -> None:
    """Export ``model`` (built and loaded as ``description`` says) to ``path``."""
    import onnx  # a clear ImportError before a long trace

    wrapper = OnnxBackbone(model.float().eval()).eval()
    size = description.img_size
    # Trace at a non-square size off the training grid (twice the batch), so no dimension can be
    # specialised to the example's value.
    example = torch.randn(2, description.in_chans, size, size + description.patch_size)
    batch, height, width = (torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width"))
    names = output_names(description)
    with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines are not our output
        program = torch.onnx.export(
            wrapper, (example,), None, input_names=["pixel_values"], output_names=names,
            dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}}, dynamo=True, opset_version=OPSET,
            verbose=False,
        )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = DESCRIPTION_KEY, description.to_json()
    onnx.save(proto, path)


def read_onnx_description(path: str) -> BackboneDescription | None:
    """The description an exported ONNX file carries, or None."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == DESCRIPTION_KEY:
            return BackboneDescription.from_json(entry.value, path)
    return None
