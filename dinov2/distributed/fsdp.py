"""FSDP2 sharding policy for the student/teacher model, kept apart from the model code.

Units: the transformer blocks (one unit per block, or with ``student.block_chunks = n > 0`` one unit per
run of ``depth / n`` consecutive blocks, as the official FSDP1 chunks were), every head, and each backbone
as the root of its own tree (its own parameters: patch embedding, tokens, position embedding, final
norm). Grouping changes only how many parameters one all-gather / reduce-scatter moves, never a key, a
shard or a result: FSDP2 shards each parameter on its own dim 0 either way, so checkpoints are the same
for every ``block_chunks``. The student and the teacher are sharded identically, so their local shards
line up one to one and the EMA update runs on local shards without any gather. Each block unit
prefetches the next one's all-gather in forward and the previous one's in backward.

Called by ``dinov2.distributed.parallelize`` after activation checkpointing and compile were applied
and before the parameters are materialised (or, with ``compute.meta_init`` off, after a plain build
from the same seed on every rank), and before the optimizer is created (``fully_shard`` replaces the
parameters by DTensors).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from dinov2.compute import DTYPES

logger = logging.getLogger(__name__)

# Entry points of the backbone besides forward() that evaluation code may call on a sharded
# teacher; FSDP must gather parameters around them too. They must run every block: a forward that stops
# early (``get_intermediate_layers`` with indices all before the last block) leaves the next unit's
# prefetched all-gather pending, and the next forward would use those weights even after an optimizer
# step (seen on torch 2.14 with one unit per block too; ``n`` as a count always runs every block).
_BACKBONE_METHODS = ("forward_features", "get_intermediate_layers")

# ``fully_shard([a, b, ...])`` makes one FSDP unit of several modules: tested here on torch 2.14 only (no
# torch 2.11 at hand), and the list form's hooks changed in between (2.14 runs the unit's pre-forward hook
# on each of its modules and completes a partly run unit at the end of the root's forward; the earlier
# source read does both only for the first / last module). Until tested there, older torch keeps one
# unit per block whatever ``block_chunks`` says.
GROUPED_UNITS = torch.__version__ >= (2, 14)


def mixed_precision_policy(dist_cfg) -> MixedPrecisionPolicy:
    """Parameters cast to ``param_dtype`` for compute, gradients reduced in ``reduce_dtype``; the
    sharded master weights and optimizer states stay float32. Used for the heads."""
    param_dtype = DTYPES[dist_cfg.param_dtype]
    reduce_dtype = DTYPES[dist_cfg.reduce_dtype]
    if param_dtype == torch.float32 and reduce_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def block_policy(policy: MixedPrecisionPolicy) -> MixedPrecisionPolicy:
    """Blocks: the same parameter / reduce dtypes, but the residual stream enters as it is.

    With autocast (compute.precision bf16/fp16) the single-process model keeps the residual stream in
    float32 (the float32 position embedding promotes it; layer norms run in float32, residual adds promote
    the low-precision branch outputs). Casting each block's input to ``param_dtype``, FSDP2's default,
    would instead carry it in bf16: with ``cast_forward_inputs=False`` both paths compute the same thing
    (up to the rounding of norm weights and LayerScale gammas to ``param_dtype``).
    """
    return replace(policy, cast_forward_inputs=False)


def root_policy(policy: MixedPrecisionPolicy) -> MixedPrecisionPolicy:
    """The backbone's own parameters (patch embedding, class / register / mask tokens, position embedding,
    final norm) stay float32 as in the single-process model; a few MB, gathered once per pass."""
    return MixedPrecisionPolicy(reduce_dtype=policy.reduce_dtype, cast_forward_inputs=False)


def _link_prefetch(units: list) -> None:
    for previous, following in zip(units, units[1:]):
        previous.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([previous])


def block_units(blocks: list[nn.Module], block_chunks: int) -> list[list[nn.Module]]:
    """The blocks grouped into FSDP units: ``block_chunks`` runs of consecutive blocks, or one unit per block
    (``block_chunks == 0``, or torch < 2.14: see :data:`GROUPED_UNITS`)."""
    if block_chunks < 0 or (block_chunks > 0 and len(blocks) % block_chunks):
        raise ValueError(f"block_chunks={block_chunks} must be 0 or divide the number of blocks ({len(blocks)})")
    if block_chunks == 0 or not GROUPED_UNITS:
        return [[block] for block in blocks]
    size = len(blocks) // block_chunks
    return [blocks[start:start + size] for start in range(0, len(blocks), size)]


def shard_backbone(backbone: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                   reshard_after_forward: bool) -> None:
    """``fully_shard`` the block units (``backbone.block_chunks``, see :func:`block_units`), then the backbone."""
    units = []
    for unit in block_units(list(backbone.blocks), getattr(backbone, "block_chunks", 0)):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=block_policy(mp_policy),
                    reshard_after_forward=reshard_after_forward)
        units.append(unit[0])  # the modules of a unit share one FSDP state: the first one stands for it
    _link_prefetch(units)
    fully_shard(backbone, mesh=mesh, mp_policy=root_policy(mp_policy), reshard_after_forward=reshard_after_forward)
    for method in _BACKBONE_METHODS:
        register_fsdp_forward_method(backbone, method)


def shard_model_dict(models: nn.ModuleDict, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                     reshard_after_forward: bool) -> None:
    """Shard ``{backbone, dino_head, [ibot_head]}``: the backbone per block unit, each head as one unit."""
    for name, module in models.items():
        if name == "backbone":
            shard_backbone(module, mesh, mp_policy, reshard_after_forward)
        else:
            fully_shard(module, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)


def shard_ssl_model(model: nn.Module, mesh: DeviceMesh, dist_cfg) -> None:
    """Shard ``model.student`` and ``model.teacher`` (an SSLMetaArch) in place. The loss centers stay
    plain replicated buffers: their updates are all-reduced, so every rank holds the same values."""
    mp_policy = mixed_precision_policy(dist_cfg)
    shard_model_dict(model.student, mesh, mp_policy, bool(dist_cfg.reshard_after_forward))
    # The teacher never runs backward: keeping its gathered weights after forward would only cost memory.
    shard_model_dict(model.teacher, mesh, mp_policy, reshard_after_forward=True)
    if getattr(model, "student_ema", None) is not None:  # distillation: sharded like the student, EMA on local shards
        shard_model_dict(model.student_ema, mesh, mp_policy, reshard_after_forward=True)
    logger.info("FSDP2: sharded student and teacher over mesh %s (param %s, reduce %s, reshard_after_forward=%s)",
                tuple(mesh.shape), dist_cfg.param_dtype, dist_cfg.reduce_dtype, dist_cfg.reshard_after_forward)
