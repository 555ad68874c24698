"""The trainer's model, built for one process of the job: ``build_training_model(cfg, env)``.

The model is ``SSLMetaArch`` (or ``DistillationMetaArch`` when ``distillation.teacher`` is set), built on
the meta device when ``compute.meta_init`` allows it, its losses handed the job's process group; the
distribution policy (``dinov2.distributed.parallelize``: activation checkpointing, compile, FSDP2,
initialisation on the device, the attention kernel) then places it. The policy sits below the model it is
applied to and does not know its class.
"""

from __future__ import annotations

import torch
from torch import nn

from dinov2.distributed import DistributedEnv
from dinov2.distributed.parallelize import parallelize_ssl_model, validate_precision
from dinov2.train.distillation import DistillationMetaArch
from dinov2.train.ssl_meta_arch import SSLMetaArch


def build_training_model(cfg, env: DistributedEnv) -> nn.Module:
    """The ``SSLMetaArch`` for ``cfg`` on ``env.device``, wrapped and sharded per the config, in train mode.

    The caller seeds the RNG first (``torch.manual_seed(cfg.train.seed)``): every rank then builds the
    same weights.
    """
    validate_precision(cfg)
    # Distillation: a frozen teacher loaded from its source, the student's EMA beside it; on meta like the rest,
    # the teacher's weights written into its shards once they exist.
    arch = DistillationMetaArch if cfg.distillation.teacher else SSLMetaArch
    meta = builds_on_meta(cfg)
    if meta:
        with torch.device("meta"):
            model = arch(cfg, process_group=env.process_group)
    else:
        model = arch(cfg, process_group=env.process_group).to(env.device)
    model = parallelize_ssl_model(model, cfg, env, on_meta=meta)
    if isinstance(model, DistillationMetaArch):
        model.load_frozen_teacher_()
    return model


def builds_on_meta(cfg) -> bool:
    """Whether the model is built on the meta device (``compute.meta_init``), then sharded and initialised on
    the device; a student that starts from ``student.pretrained_weights`` is built on the CPU."""
    return bool(cfg.compute.meta_init) and not cfg.student.pretrained_weights
