"""The one distribution policy: how the student/teacher model is built, wrapped and placed for training.

Kept apart from the model code (torchtitan, dinov3). ``dinov2.train.model.build_training_model`` builds the
trainer's model and ``parallelize_ssl_model`` applies the rest, in order:

1. build the ``SSLMetaArch`` on the meta device (``compute.meta_init``; a build that loads pretrained
   weights is made on the CPU as before and moved to the device) -- in dinov2/train/model.py;
2. activation checkpointing of the student blocks (``compute.activation_checkpointing``: none | full |
   selective -- selective keeps matmul and attention outputs and recomputes the cheap rest);
3. ``torch.compile`` of every transformer block, student and teacher (``compute.compile``); the heads and
   losses stay eager, so the number of masked iBOT tokens, which changes every step, never reaches a
   compiled region;
4. FSDP2 sharding (``dinov2.distributed.fsdp``) when a process group exists;
5. materialise on the device and initialise: the same random draws, in the same order, as a plain
   build from the same seed (so on CPU the weights are equal to it), one module at a time with sharded
   parameters generated whole and sliced, so every world size gets the same model;
6. the attention kernel for the device and the training dtype, chosen once (probe + timing on CUDA,
   agreed across ranks) and stored on the model.

It also checks ``compute.precision`` against ``distributed.param_dtype`` / ``reduce_dtype`` and turns on
TF32 for the float32 matmuls that remain on CUDA.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from dinov2.compute import DTYPES
from dinov2.configs import ConfigError
from dinov2.layers.attention_backends import varlen_available
from dinov2.layers.initialization import InitStep
from dinov2.loss.centering import TeacherCentering

from .fsdp import shard_ssl_model

logger = logging.getLogger(__name__)

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


# ------------------------------------------------------------------ configuration checks
def validate_precision(cfg) -> None:
    """``distributed.param_dtype`` is fp32 or the autocast dtype; low-precision reduction of fp16 needs
    the grad scaler that only ``compute.precision=fp16`` enables."""
    precision = str(cfg.compute.precision)
    param, reduce = str(cfg.distributed.param_dtype), str(cfg.distributed.reduce_dtype)
    if param not in ("fp32", precision):
        raise ConfigError(
            f"distributed.param_dtype={param} does not match compute.precision={precision}: FSDP would run the "
            f"blocks in {param} {'without autocast' if precision == 'fp32' else f'under {precision} autocast'}; "
            f"use distributed.param_dtype={precision} (recommended on GPUs: bf16 with bf16 compute) or fp32"
        )
    if "fp16" in (param, reduce) and precision != "fp16":
        raise ConfigError(
            f"distributed.param_dtype={param} / reduce_dtype={reduce}: fp16 gradients need the grad scaler, "
            f"which compute.precision=fp16 enables (got compute.precision={precision}); use bf16 or fp32"
        )
    mode = str(cfg.compute.activation_checkpointing)
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ConfigError(f"compute.activation_checkpointing={mode!r}; choose one of {', '.join(ACTIVATION_CHECKPOINTING)}")


def training_dtype(cfg) -> torch.dtype:
    return DTYPES[str(cfg.compute.precision)]


def enable_tf32(device: torch.device) -> None:
    """Float32 matmuls and convolutions on CUDA use TF32 tensor cores (a process-wide torch setting)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ------------------------------------------------------------------ activation checkpointing
def _selective_save_ops() -> set:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    if varlen_available():  # importing torch.nn.attention.varlen registers its custom op
        varlen = getattr(torch.ops.torch_attn, "_varlen_attn", None)
        if varlen is not None:
            ops.add(varlen.default)
    return ops


def _selective_policy(save_ops: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_wrapper_for(mode: str):
    """``full``: keep only the block input; ``selective``: also keep matmul / attention outputs."""
    if mode == "full":
        return partial(checkpoint_wrapper, preserve_rng_state=True)
    if mode == "selective":
        context_fn = partial(create_selective_checkpoint_contexts, partial(_selective_policy, _selective_save_ops()))
        return partial(checkpoint_wrapper, context_fn=context_fn, preserve_rng_state=True)
    raise ValueError(f"activation checkpointing mode {mode!r}; choose full or selective")


def _replace_blocks(backbone: nn.Module, fn) -> None:
    """Replace every block by ``fn(block)`` in place."""
    for i, block in enumerate(backbone.blocks):
        backbone.blocks[i] = fn(block)


def apply_activation_checkpointing(backbone: nn.Module, mode: str) -> None:
    """Wrap each block (state-dict keys are unchanged: the wrapper strips its own prefix)."""
    if mode == "none":
        return
    _replace_blocks(backbone, checkpoint_wrapper_for(mode))


# ------------------------------------------------------------------ compile
def compile_blocks(backbone: nn.Module) -> None:
    """``torch.compile`` each block in place (``nn.Module.compile``: parameter names are unchanged).

    All blocks share one code object, and a graph is specialised per (drop rate, train/eval, crop layout):
    the recompile limit is raised to cover every block of the student and the teacher.
    """
    blocks = list(backbone.blocks)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 4 * len(blocks) + 8)
    for block in blocks:
        block.compile()


# ------------------------------------------------------------------ materialise + initialise
def _run_step_sharded(module: nn.Module, fn) -> None:
    """Run ``fn(module)`` with each sharded parameter swapped for a whole tensor, then keep this rank's slice.

    Every rank draws the same numbers (same seed, same device type), so the slices form the tensor a
    single process would have drawn, for any world size or mesh.
    """
    sharded = {name: p for name, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    if not sharded:
        fn(module)
        return
    for name, p in sharded.items():  # NaN-filled: a parameter the step does not set is caught below
        module._parameters[name] = nn.Parameter(torch.full(p.shape, float("nan"), dtype=p.dtype, device=p.device),
                                                requires_grad=p.requires_grad)
    try:
        fn(module)
        for name, p in sharded.items():
            whole = module._parameters[name].detach()
            if whole.isnan().any():
                raise RuntimeError(f"init step {getattr(fn, '__qualname__', fn)} on {type(module).__name__} left "
                                   f"parameter {name!r} (partly) unset")
            p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())
    finally:
        for name, p in sharded.items():
            module._parameters[name] = p


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def materialize_(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-built ``SSLMetaArch`` on ``device`` and initialise it as a plain build would:
    the student's modules in construction order, then the teacher backbone's draws (a plain build makes
    them and overwrites them with the student's weights: replayed so the RNG ends in the same state),
    then teacher <- student and zeroed loss centers. The EMA is ``model.ema_model`` (the student's EMA when
    distilling: the frozen teacher is left allocated but unset, its owner loads it)."""
    model.to_empty(device=device)
    ema = model.ema_model
    steps: list[InitStep] = []
    for module in model.student.values():
        steps += module.init_steps()
    steps += ema.backbone.init_steps()
    for module, fn in steps:
        _run_step_sharded(module, fn)
    for name in ema.keys():
        teacher, student = ema[name], model.student[name]
        for t, s in zip(teacher.parameters(), student.parameters()):
            _local(t).copy_(_local(s))
        for t, s in zip(teacher.buffers(), student.buffers()):
            t.copy_(s)
    for module in model.modules():
        if isinstance(module, TeacherCentering):
            module.reset_center()


# ------------------------------------------------------------------ attention kernel
def resolve_attention(model: nn.Module, requested: str, device: torch.device, dtype: torch.dtype,
                      process_group: dist.ProcessGroup | None = None) -> str:
    """Choose the kernel once for student and teacher; with a process group rank 0's choice is used
    everywhere (timings may differ slightly between GPUs, the maths must not)."""
    name = model.student.backbone.resolve_attention_backend(device, dtype, requested=str(requested))
    if process_group is not None:
        choice = [name]
        dist.broadcast_object_list(choice, src=dist.get_global_rank(process_group, 0), group=process_group)
        name = choice[0]
    for backbone in _backbones(model):
        backbone.set_attention_backend(name)
    logger.info("attention backend: %s (requested %s, %s, %s)", name, requested, device, dtype)
    return name


# ------------------------------------------------------------------ the policy
def _backbones(model: nn.Module) -> list[nn.Module]:
    """Student and teacher backbones, and the student's EMA in distillation."""
    ema = getattr(model, "student_ema", None)
    return [model.student.backbone, model.teacher.backbone] + ([ema.backbone] if ema is not None else [])


def parallelize_ssl_model(model: nn.Module, cfg, env, *, on_meta: bool) -> nn.Module:
    """Steps 2-6 on a built ``SSLMetaArch`` (``on_meta``: built on the meta device, step 1): activation
    checkpointing, compile, FSDP2 when ``env`` is distributed, materialise and initialise on ``env.device``,
    the attention kernel. Returns the model in train mode. ``dinov2.train.model`` builds the model."""
    device = env.device
    enable_tf32(device)
    apply_activation_checkpointing(model.student.backbone, str(cfg.compute.activation_checkpointing))
    if cfg.compute.compile:
        for backbone in _backbones(model):
            compile_blocks(backbone)
    if env.is_distributed:
        shard_ssl_model(model, env.mesh, cfg.distributed)
    if on_meta:
        materialize_(model, device)
    resolve_attention(model, cfg.student.attention_backend, device, training_dtype(cfg), env.process_group)
    return model.train()
