"""The closed sets of values some config keys take: one enum per set, defined once.

Each member's name is its value, so YAML files and ``key=value`` overrides spell members as plain
strings (OmegaConf converts them and rejects anything else, listing the choices). A member is a
``str``: it compares, hashes, formats and reprs like its value (``Precision.bf16 == "bf16"``), so code
that receives one needs no conversion. Standard library only: the model layers import these enums, and
``hubconf`` must not pull in OmegaConf.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """Base of the config enums: a member behaves as its string value (also in ``repr``, so code that
    writes ``f"{value!r}"``, e.g. a generated ``torch.hub.load(..., ffn_layer='mlp')`` line, stays valid)."""

    def __repr__(self) -> str:
        return repr(self.value)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Every value, in definition order (for messages and membership tests on plain strings)."""
        return tuple(member.value for member in cls)


class Arch(Choice):
    vit_small = "vit_small"
    vit_base = "vit_base"
    vit_large = "vit_large"
    vit_giant2 = "vit_giant2"


class FfnLayer(Choice):
    mlp = "mlp"
    swiglu = "swiglu"  # the official code maps swiglu and swiglufused to the same fused-width SwiGLU
    swiglufused = "swiglufused"
    identity = "identity"


class AttentionBackend(Choice):
    """Attention kernels (dinov2/layers/attention_backends.py describes each)."""

    auto = "auto"  # first: the concrete backends are the rest
    sdpa = "sdpa"
    math = "math"
    varlen = "varlen"  # torch.nn.attention.varlen (torch >= 2.10, CUDA)
    xformers = "xformers"
    sdpa_masked = "sdpa_masked"


class ScalingRule(Choice):
    """How optim.base_lr scales with the global batch size."""

    sqrt_wrt_1024 = "sqrt_wrt_1024"
    linear_wrt_256 = "linear_wrt_256"
    none = "none"


class Centering(Choice):
    """How the teacher's outputs are centred: running-mean centering or Sinkhorn-Knopp."""

    centering = "centering"
    sinkhorn_knopp = "sinkhorn_knopp"


class ActivationCheckpointing(Choice):
    """compute.activation_checkpointing: which student-block activations are recomputed in backward."""

    none = "none"
    full = "full"  # keep only each block's input
    selective = "selective"  # keep matmul and attention outputs, recompute the cheap rest


class Precision(Choice):
    """Autocast precision (compute.precision) and FSDP2 parameter / reduce dtypes."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Launcher(Choice):
    """How the processes were started (distributed.launcher)."""

    auto = "auto"
    torchrun = "torchrun"
    slurm = "slurm"
    single = "single"


class CropPipeline(Choice):
    """How the multi-crop parameters are applied (dinov2.data.augmentations): ``reference`` with
    torchvision / PIL as the official pipeline, ``fast`` with OpenCV and torch uint8 kernels."""

    reference = "reference"
    fast = "fast"


class DistBackend(Choice):
    """The process-group backend: auto is nccl on CUDA, gloo on CPU."""

    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class DistillationHeads(Choice):
    """distillation.heads: where the frozen teacher's DINO / iBOT heads come from (dinov2/train/distillation.py)."""

    auto = "auto"  # trained: a run directory's own heads; kmeans: a file or hub backbone (released without heads)
    trained = "trained"
    kmeans = "kmeans"  # prototypes = spherical k-means centroids of the teacher's features on the training data
    random = "random"  # prototypes drawn at random (the baseline the k-means heads are measured against)
