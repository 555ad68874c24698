"""Distillation of a large frozen teacher into a smaller student (DINOv2 paper, sec. 5 / appendix).

    dinov2-train --config train/vits14.yaml --output-dir runs/s distillation.teacher=runs/g     (a run of ours)
    ... distillation.teacher=teacher.safetensors                                               (dinov2-export output)
    ... distillation.teacher=dinov2_vitg14 distillation.teacher_weights=LVD142M                (a hub backbone)

The recipe of the paper, a switch of the same trainer: the large model is a FROZEN teacher (no EMA of
it), the student is trained with the same DINO + iBOT + KoLeo losses against the teacher's head
outputs, WITHOUT masking and WITHOUT stochastic depth, the iBOT loss on every patch of BOTH global
crops, and a separate EMA of the student (momentum schedule ``teacher.momentum_teacher`` ->
``final_momentum_teacher``) is kept: it is the run's final model (kNN during training, ``dinov2-export``
by default). The teacher runs in inference mode and is FSDP-sharded like the student; its width may
differ from the student's (each side has its own heads into the same K prototypes).

Teacher heads (``distillation.heads``): a run directory brings its trained teacher heads and loss centers
(``auto``/``trained``); released and exported backbones have no heads, so ``auto``/``kmeans`` fits
prototype heads by spherical k-means of the teacher's features before the first step
(``dinov2.train.teacher_heads`` says why), ``random`` draws them at random (a baseline).

Checked before anything trains: the teacher exists and loads exactly into its declared architecture
(a file's description, a run's config, a hub entry point), its patch size and input channels equal the
student's, and its prototype counts equal the student's ``dino.head_n_prototypes`` /
``ibot.head_n_prototypes``. The teacher's input normalisation (its description's mean / std) is applied
to the crops it sees, whatever ``crops.mean`` / ``crops.std`` the student uses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dinov2.compute import autocast_dtype
from dinov2.configs import ConfigError, load_config
from dinov2.data import SSLBatch
from dinov2.seeding import STREAM_TEACHER_PATCHES, torch_generator
from dinov2.train.ssl_meta_arch import N_GLOBAL_CROPS, SSLMetaArch, _head
from dinov2.train.teacher_heads import PrototypeHead, fit_prototypes

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # released backbones' input


@dataclass
class FrozenTeacher:
    """A loaded teacher: its backbone, its trained heads (None: to be fitted), its input normalisation."""

    backbone: nn.Module
    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    heads: dict[str, nn.Module] | None = None
    centers: dict[str, Tensor] = field(default_factory=dict)  # trained loss centers of a run directory


# ------------------------------------------------------------------ reading the teacher
def _run_teacher(path: str, cfg) -> FrozenTeacher:
    """A run (or checkpoint) directory of ours: its final model (the teacher, or the student EMA of a
    distillation run), the heads next to it and the loss centers; the run's config.yaml declares it."""
    from dinov2.checkpoint.export import backbone_state_dict, check_described, read_tensors, resolve_checkpoint
    from dinov2.checkpoint.metadata import read_metadata
    from dinov2.hub.description import from_config
    from dinov2.models.vision_transformer import build_vit

    checkpoint = resolve_checkpoint(Path(path))
    config_file = checkpoint.parent.parent / "config.yaml"
    if not config_file.exists():
        raise ConfigError(f"distillation.teacher={path}: no config.yaml next to {checkpoint.parent} declares the "
                          "teacher's architecture")
    run_cfg = load_config(config_file)
    keys = read_metadata(checkpoint).state_dict_metadata
    which = "student_ema" if any(k.startswith("model.student_ema.backbone.") for k in keys) else "teacher"
    state = backbone_state_dict(checkpoint, which)
    description = from_config(run_cfg)
    check_described(state, description, str(checkpoint))  # the error names the keys that do not fit
    backbone = build_vit(description.arch, **description.builder_kwargs(),
                         attention_backend=cfg.student.attention_backend)
    backbone.load_state_dict(state, strict=True)

    heads = {"dino_head": _head(description.embed_dim, run_cfg.dino)}
    if run_cfg.ibot.loss_weight > 0 and run_cfg.ibot.separate_head:
        heads["ibot_head"] = _head(description.embed_dim, run_cfg.ibot)
    for name, head in heads.items():
        prefix = f"model.{which}.{name}."
        tensors = {k[len(prefix):]: v for k, v in read_tensors(checkpoint, prefix).items()}
        from dinov2.hub.weights import load_exact

        load_exact(head, tensors, f"{checkpoint} ({which}.{name})")
    centers = {k[len("model."):]: v for k, v in read_tensors(checkpoint, "model.").items()
               if k in ("model.dino_loss.center", "model.ibot_patch_loss.center")}
    return FrozenTeacher(backbone, f"{checkpoint} ({which})", description.mean, description.std, heads, centers)


def _file_teacher(path: str, cfg) -> FrozenTeacher:
    """A backbone file written by dinov2-export: built as its description says, loaded exactly."""
    from dinov2.hub.backbones import load_described

    backbone, description = load_described(path, attention_backend=cfg.student.attention_backend)
    return FrozenTeacher(backbone, path, description.mean, description.std)


def _hub_teacher(name: str, cfg) -> FrozenTeacher:
    """A torch.hub backbone (``dinov2_vitl14``, ...) with ``distillation.teacher_weights``; released
    backbones expect ImageNet-normalised RGB (a self-describing weights file says its own)."""
    from dinov2.hub.backbones import BACKBONES
    from dinov2.hub.weights import load_weights, resolve_backbone_weights

    weights = cfg.distillation.teacher_weights
    backbone = BACKBONES[name](pretrained=True, weights=weights, attention_backend=cfg.student.attention_backend)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if weights != "LVD142M":  # a local file may describe its input
        location = resolve_backbone_weights(weights, "vit_small", 14)
        description = load_weights(location).description
        if description is not None:
            mean, std = description.mean, description.std
    return FrozenTeacher(backbone, f"{name} ({weights})", tuple(mean), tuple(std))


def load_teacher(cfg) -> FrozenTeacher:
    """The teacher ``distillation.teacher`` names, loaded and checked against the student (errors are
    ConfigErrors naming the key and the value)."""
    from dinov2.hub.backbones import BACKBONES

    spec = str(cfg.distillation.teacher)
    path = Path(spec)
    read = (_hub_teacher if spec in BACKBONES else _run_teacher if path.is_dir()
            else _file_teacher if path.is_file() else None)
    if read is None:
        raise ConfigError(f"distillation.teacher={spec!r} is neither a run directory, a backbone file (dinov2-export "
                          f"output) nor a hub backbone ({', '.join(BACKBONES)})")
    try:
        teacher = read(spec, cfg)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as error:  # a file that does not fit its declared architecture, ...
        where = f" (distillation.teacher_weights={cfg.distillation.teacher_weights})" if spec in BACKBONES else ""
        raise ConfigError(f"distillation.teacher={spec}{where}: {error}") from None
    _check_compatible(teacher, cfg)
    return teacher


def _check_compatible(teacher: FrozenTeacher, cfg) -> None:
    backbone = teacher.backbone
    patch = backbone.patch_embed.proj.kernel_size[0]
    if patch != cfg.student.patch_size:
        raise ConfigError(
            f"distillation.teacher={cfg.distillation.teacher}: the teacher's patch size is {patch}, the student's "
            f"student.patch_size={cfg.student.patch_size}; the iBOT loss matches patch tokens one to one, so they "
            f"must be equal (set student.patch_size={patch})")
    in_chans = backbone.patch_embed.proj.in_channels
    if in_chans != cfg.student.in_chans:
        raise ConfigError(
            f"distillation.teacher={cfg.distillation.teacher}: the teacher takes {in_chans} input channels, the "
            f"student student.in_chans={cfg.student.in_chans}; both see the same crops")
    method = heads_method(cfg, has_trained_heads=teacher.heads is not None)
    if method != "trained":
        return
    checks = [("dino.head_n_prototypes", cfg.dino.head_n_prototypes, teacher.heads["dino_head"])]
    if cfg.ibot.loss_weight > 0:  # the student's iBOT logits: its own iBOT head, or the shared DINO head
        key = "ibot.head_n_prototypes" if cfg.ibot.separate_head else "dino.head_n_prototypes"
        checks.append((key, cfg[key.split(".")[0]].head_n_prototypes,
                       teacher.heads.get("ibot_head", teacher.heads["dino_head"])))
    for key, student_k, head in checks:
        teacher_k = head.last_layer.weight.shape[0]
        if student_k != teacher_k:
            raise ConfigError(
                f"distillation.teacher={cfg.distillation.teacher}: its heads have {teacher_k} prototypes, the "
                f"student's {key}={student_k}; the student's heads map to the teacher's prototypes: set {key}="
                f"{teacher_k} (or distillation.heads=kmeans to fit new teacher heads of the student's size)")


def heads_method(cfg, *, has_trained_heads: bool) -> str:
    """``trained`` | ``kmeans`` | ``random`` for ``distillation.heads`` and the teacher at hand."""
    method = str(cfg.distillation.heads)
    if method == "auto":
        return "trained" if has_trained_heads else "kmeans"
    if method == "trained" and not has_trained_heads:
        raise ConfigError(f"distillation.heads=trained: the teacher {cfg.distillation.teacher} has no heads (only a "
                          "run directory of ours keeps them); use distillation.heads=kmeans (or auto)")
    return method


def _without_stochastic_depth(cfg):
    if cfg.student.drop_path_rate > 0:
        logger.info("distillation: student.drop_path_rate=%s is not used (the recipe trains without stochastic "
                    "depth)", cfg.student.drop_path_rate)
    cfg = copy.deepcopy(cfg)
    cfg.student.drop_path_rate = 0.0
    return cfg


# ------------------------------------------------------------------ the model
class DistillationMetaArch(SSLMetaArch):
    """``SSLMetaArch`` whose ``teacher`` is the frozen teacher and whose ``student_ema`` is the final model."""

    def __init__(self, cfg, process_group=None) -> None:
        # Built under torch.device("meta") (compute.meta_init) like the student: the teacher's weights are read
        # on the CPU, kept as one state dict and loaded after sharding (``load_frozen_teacher_``), so no process
        # ever holds the whole teacher on its device.
        on_meta = torch.empty(0).is_meta
        # Read and checked before anything is built; the teacher's build draws no numbers from the global
        # RNG, so the student starts from exactly the weights a from-scratch run with this seed has.
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            frozen = load_teacher(cfg)
        super().__init__(_without_stochastic_depth(cfg), process_group)
        self.student_ema = self.teacher  # the student without drop path, from the same initial weights
        self.head_method = heads_method(cfg, has_trained_heads=frozen.heads is not None)
        with torch.device("cpu"):
            heads = frozen.heads if self.head_method == "trained" else self._prototype_heads(frozen.backbone.embed_dim)
        self.teacher = nn.ModuleDict({"backbone": frozen.backbone, **heads})
        self.teacher.requires_grad_(False)
        self.teacher_source = frozen.source
        # The frozen teacher and (trained heads) its loss centers: set now, or after sharding when built on meta.
        state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        if self.head_method == "trained":
            state.update(frozen.centers)
        self._frozen_state: dict[str, Tensor] | None = None
        if on_meta:
            self._frozen_state = state
            self.teacher.to("meta")
        else:
            self.load_state_dict({k: v for k, v in state.items() if not k.startswith("teacher.")}, strict=False)
        # The teacher's own input normalisation: x_teacher = x * scale + shift (per channel) on the student's input.
        student_mean, student_std = torch.tensor(self.crop_mean, device="cpu"), torch.tensor(self.crop_std, device="cpu")
        scale = student_std / torch.tensor(frozen.std, device="cpu")
        shift = (student_mean - torch.tensor(frozen.mean, device="cpu")) / torch.tensor(frozen.std, device="cpu")
        self._input_map = None if torch.allclose(scale, torch.ones_like(scale)) and not shift.any() else (
            tuple(scale.tolist()), tuple(shift.tolist()))
        logger.info("distillation: frozen teacher %s (%.2f M parameters, dim %d), heads: %s", frozen.source,
                    sum(p.numel() for p in frozen.backbone.parameters()) / 1e6, frozen.backbone.embed_dim,
                    self.head_method)

    @torch.no_grad()
    def load_frozen_teacher_(self) -> None:
        """After a meta build has been sharded and materialised (``materialize_`` initialises the student and
        its EMA, not the teacher): write the teacher's weights and its loss centers, each rank its shards."""
        if self._frozen_state is None:
            return
        targets = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for name, value in self._frozen_state.items():
            target = targets[name]
            value = value.to(target.device)
            if isinstance(target, nn.Parameter):
                _set_parameter(target, value)
            else:
                target.copy_(value.view_as(target))
        self._frozen_state = None

    def _prototype_heads(self, teacher_dim: int) -> dict[str, nn.Module]:
        """Heads of the student's prototype counts, to be fitted on the teacher's features: one on class and
        patch tokens when the student shares its head between DINO and iBOT, else one each."""
        if self.do_ibot and self.ibot_separate_head:
            return {"dino_head": PrototypeHead(teacher_dim, self.cfg.dino.head_n_prototypes, ("cls",)),
                    "ibot_head": PrototypeHead(teacher_dim, self.cfg.ibot.head_n_prototypes, ("patch",))}
        fit_on = ("cls", "patch") if self.do_ibot else ("cls",)
        return {"dino_head": PrototypeHead(teacher_dim, self.cfg.dino.head_n_prototypes, fit_on)}

    def train(self, mode: bool = True) -> "DistillationMetaArch":
        super().train(mode)  # the frozen teacher stays in eval mode
        self.student_ema.eval()
        return self

    @property
    def ema_model(self) -> nn.ModuleDict:
        return self.student_ema

    def _ibot_head(self, model: nn.ModuleDict) -> nn.Module:
        return model["ibot_head"] if "ibot_head" in model else model["dino_head"]

    def teacher_input(self, global_crops: Tensor) -> Tensor:
        """Normalised global crops as the teacher expects them (its own mean / std)."""
        if self._input_map is None:
            return global_crops
        scale, shift = (torch.tensor(v, device=global_crops.device, dtype=global_crops.dtype).view(1, -1, 1, 1)
                        for v in self._input_map)
        return global_crops * scale + shift

    def _teacher_targets(self, batch: SSLBatch, teacher_temp: float):
        return super()._teacher_targets(dataclasses.replace(batch, global_crops=self.teacher_input(batch.global_crops)),
                                        teacher_temp)

    def forward(self, batch: SSLBatch, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The DINOv2 objective with the unmasked student and the iBOT loss on every global-crop patch."""
        return self._loss(every_patch(self.normalized(batch)), teacher_temp, mask_student=False)


def every_patch(batch: SSLBatch) -> SSLBatch:
    """``batch`` with every patch of every global crop selected for the iBOT loss (each image's patches
    weighted 1 / their count, as the masked loss weights its masked ones)."""
    n_crops, n_tokens = batch.masks.shape
    device = batch.masks.device
    total = n_crops * n_tokens
    return dataclasses.replace(
        batch, masks=torch.ones_like(batch.masks, dtype=torch.bool), mask_indices=torch.arange(total, device=device),
        masks_weight=torch.full((total,), 1.0 / n_tokens, device=device),
        n_masked_patches=torch.full_like(batch.n_masked_patches, total))


# ------------------------------------------------------------------ fitting head-less teachers
@torch.no_grad()
def teacher_features(model: DistillationMetaArch, cfg, dataset, device: torch.device) -> dict[str, Tensor]:
    """Teacher class tokens and (at most 4 per crop, seeded) patch tokens of the global crops of the first
    ``distillation.kmeans_images`` training images, as the training loader augments them. Every rank computes
    the same (the teacher is sharded: all ranks take part in each forward). Rows are image-major (image, crop)
    and the patches of image p are drawn from (seed, p): the features, hence the fitted heads, do not depend on
    ``train.batch_size_per_gpu`` (so not on how a global batch is split over ranks either)."""
    from dinov2.train.build import build_train_loader

    n_images = min(int(cfg.distillation.kmeans_images), len(dataset))
    loader = build_train_loader(cfg, dataset, start=0)
    dtype = autocast_dtype(cfg.compute.precision)
    cls, patches = [], []
    batches = iter(loader)
    seen = 0
    while seen < n_images:
        batch = model.normalized(next(batches).to(device))
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            out = model.teacher.backbone(model.teacher_input(batch.global_crops), is_training=True)
        n_crops = N_GLOBAL_CROPS
        images = min(out["x_norm_clstoken"].shape[0] // n_crops, n_images - seen)
        # crop-major [crop, image] -> image-major [image, crop]
        cls_tokens = out["x_norm_clstoken"].float().unflatten(0, (n_crops, -1)).transpose(0, 1)[:images].flatten(0, 1)
        tokens = out["x_norm_patchtokens"].float().unflatten(0, (n_crops, -1)).transpose(0, 1)[:images]
        keep = torch.stack([torch.rand(n_crops, tokens.shape[2], generator=torch_generator(
            cfg.train.seed, STREAM_TEACHER_PATCHES, seen + i)).argsort(1)[:, :4] for i in range(images)]).to(device)
        tokens = tokens.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, tokens.shape[-1]))
        cls.append(cls_tokens)
        patches.append(tokens.flatten(0, 2))
        seen += images
    del batches
    return {"cls": torch.cat(cls), "patch": torch.cat(patches)}


def _set_parameter(parameter: nn.Parameter, value: Tensor) -> None:
    """Write a whole tensor into a (possibly FSDP-sharded) parameter: each rank keeps its slice."""
    if isinstance(parameter, DTensor):
        value = distribute_tensor(value.to(parameter.dtype), parameter.device_mesh, parameter.placements,
                                  src_data_rank=None).to_local()
        parameter.to_local().copy_(value)
    else:
        parameter.data.copy_(value)


def fit_teacher_heads(model: nn.Module, cfg, dataset, env) -> None:
    """Fit the prototype heads of a head-less distillation teacher (nothing to do otherwise). Called
    once, before the first step of a new run; the fitted heads are part of every checkpoint."""
    if not isinstance(model, DistillationMetaArch) or model.head_method == "trained":
        return
    started = time.perf_counter()
    features = teacher_features(model, cfg, dataset, env.device)
    for name, head in model.teacher.items():
        if not isinstance(head, PrototypeHead):
            continue
        points = torch.cat([features[role] for role in head.fit_on])
        if points.shape[0] < head.n_prototypes:
            raise ConfigError(
                f"distillation: {points.shape[0]} teacher features to fit {head.n_prototypes} prototypes of the "
                f"{name}: raise distillation.kmeans_images (now {cfg.distillation.kmeans_images}; the data has "
                f"{len(dataset)} images) or lower the prototype count")
        fitted = fit_prototypes(head, points, model.head_method, int(cfg.distillation.kmeans_iterations),
                                int(cfg.train.seed))
        mean, prototypes = fitted["mean"].to(env.device), fitted["prototypes"].to(env.device)
        if env.process_group is not None:  # the same on every rank already; rank 0's copy makes it exact
            src = dist.get_global_rank(env.process_group, 0)
            dist.broadcast(mean, src=src, group=env.process_group)
            dist.broadcast(prototypes, src=src, group=env.process_group)
        _set_parameter(head.mean, mean)
        _set_parameter(head.prototypes, prototypes)
        logger.info("distillation: teacher %s = %s prototypes of %d %s tokens (%d of %d prototypes used), %.1f s",
                    name, model.head_method, fitted["points"], "+".join(head.fit_on), fitted["used_prototypes"],
                    head.n_prototypes, time.perf_counter() - started)
