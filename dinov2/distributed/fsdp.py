"""FSDP2 sharding policy for the student/teacher model, kept apart from the model code.

Units: every transformer block, every head, and each backbone as the root of its own tree (its
own parameters: patch embedding, tokens, position embedding, final norm). The student and the
teacher are sharded identically, so their local shards line up one to one and the EMA update
runs on local shards without any gather. Blocks prefetch the next block's all-gather in forward
and the previous block's in backward.

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
# teacher; FSDP must gather parameters around them too.
_BACKBONE_METHODS = ("forward_features", "get_intermediate_layers")


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


def shard_backbone(backbone: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                   reshard_after_forward: bool) -> None:
    """``fully_shard`` each block (``block_list()`` also finds blocks inside chunks), then the backbone."""
    blocks = [fully_shard(block, mesh=mesh, mp_policy=block_policy(mp_policy), reshard_after_forward=reshard_after_forward)
              for block in backbone.block_list()]
    _link_prefetch(blocks)
    fully_shard(backbone, mesh=mesh, mp_policy=root_policy(mp_policy), reshard_after_forward=reshard_after_forward)
    for method in _BACKBONE_METHODS:
        register_fsdp_forward_method(backbone, method)


def shard_model_dict(models: nn.ModuleDict, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                     reshard_after_forward: bool) -> None:
    """Shard ``{backbone, dino_head, [ibot_head]}``: the backbone per block, each head as one unit."""
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
