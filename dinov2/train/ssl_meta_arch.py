"""Student / EMA teacher with DINO + iBOT heads and the DINOv2 objective.

The student sees every crop (2 global + N local) in ONE packed backbone pass; the teacher sees
the global crops. Loss bookkeeping follows the official recipe exactly (term counts, the
global-crop swap, iBOT weighting), but the forward pass only computes the loss: backward,
clipping and the optimizer belong to the trainer.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.data import SSLBatch, normalize_crops
from dinov2.hub.filters import backbone_filter_fn
from dinov2.hub.weights import load_exact, load_state_dict_from, resolve_backbone_weights
from dinov2.layers.dino_head import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.models.arch import backbone_kwargs
from dinov2.models.vision_transformer import DinoVisionTransformer, build_vit

N_GLOBAL_CROPS = 2


def build_backbone(student_cfg, img_size: int, *, with_drop_path: bool) -> DinoVisionTransformer:
    """The architecture exports describe (``backbone_kwargs``) plus the training-only settings."""
    kwargs = dict(backbone_kwargs(student_cfg, img_size), block_chunks=student_cfg.block_chunks,
                  attention_backend=student_cfg.attention_backend)
    if with_drop_path:
        kwargs.update(drop_path_rate=student_cfg.drop_path_rate, drop_path_uniform=student_cfg.drop_path_uniform)
    return build_vit(student_cfg.arch, **kwargs)


def _head(embed_dim: int, head_cfg) -> DINOHead:
    return DINOHead(
        in_dim=embed_dim, out_dim=head_cfg.head_n_prototypes, hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim, nlayers=head_cfg.head_nlayers,
    )


def _entropy(probabilities: Tensor) -> Tensor:
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg, process_group=None) -> None:
        """``process_group``: the ranks whose global batch the losses center over (None: one process)."""
        super().__init__()
        self.cfg = cfg
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = cfg.ibot.separate_head
        self.centering = cfg.train.centering
        self.n_local_crops = cfg.crops.local_crops_number
        self.crop_mean, self.crop_std = tuple(cfg.crops.mean), tuple(cfg.crops.std)

        backbone = build_backbone(cfg.student, cfg.crops.global_crops_size, with_drop_path=True)
        if cfg.student.pretrained_weights:
            location = resolve_backbone_weights(cfg.student.pretrained_weights, cfg.student.arch,  # LVD142M: released
                                                cfg.student.patch_size, cfg.student.num_register_tokens)
            state = backbone_filter_fn(load_state_dict_from(location), backbone, source=location,  # flat/chunked keys,
                                       ffn_key="student.ffn_layer")  # pos-embed grid (dinov2/hub/filters.py)
            load_exact(backbone, state, location)
        student = {"backbone": backbone, "dino_head": _head(backbone.embed_dim, cfg.dino)}
        if self.do_ibot and self.ibot_separate_head:
            student["ibot_head"] = _head(backbone.embed_dim, cfg.ibot)
        self.student = nn.ModuleDict(student)

        # The teacher is the student without stochastic depth, starting from the same weights.
        teacher_backbone = build_backbone(cfg.student, cfg.crops.global_crops_size, with_drop_path=False)
        teacher_backbone.load_state_dict(backbone.state_dict())
        teacher = {"backbone": teacher_backbone}
        teacher.update({k: copy.deepcopy(v) for k, v in student.items() if k != "backbone"})
        self.teacher = nn.ModuleDict(teacher)
        self.teacher.requires_grad_(False)

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, process_group=process_group)
        ibot_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim, process_group=process_group)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # the EMA teacher never uses stochastic depth
        return self

    @property
    def embed_dim(self) -> int:
        return self.student.backbone.embed_dim

    # ------------------------------------------------------------------ teacher
    def _ibot_head(self, model: nn.ModuleDict) -> nn.Module:
        return model["ibot_head"] if self.ibot_separate_head else model["dino_head"]

    def normalized(self, batch: SSLBatch) -> SSLBatch:
        """``batch`` with its crops as the backbone takes them: float32, normalised with crops.mean / crops.std
        on the batch's device (the loader ships them as uint8)."""
        return dataclasses.replace(batch, global_crops=normalize_crops(batch.global_crops, self.crop_mean, self.crop_std),
                                   local_crops=normalize_crops(batch.local_crops, self.crop_mean, self.crop_std))

    def teacher_targets(self, batch: SSLBatch, teacher_temp: float) -> tuple[Tensor, Tensor | None, dict]:
        """Centred, sharpened teacher distributions: ``[2, B, K]`` for the class tokens (crop order
        swapped, so each student global crop is matched with the OTHER teacher crop) and
        ``[n_masked, K]`` for the masked patches."""
        return self._teacher_targets(self.normalized(batch), teacher_temp)

    @torch.no_grad()
    def _teacher_targets(self, batch: SSLBatch, teacher_temp: float) -> tuple[Tensor, Tensor | None, dict]:
        out = self.teacher.backbone(batch.global_crops, is_training=True)
        cls_first, cls_second = out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
        cls_tokens = torch.cat((cls_second, cls_first))
        cls_logits = self.teacher.dino_head(cls_tokens)
        patch_logits = None
        if self.do_ibot:
            masked_tokens = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch.mask_indices)
            patch_logits = self._ibot_head(self.teacher)(masked_tokens)

        if self.centering == "centering":
            cls_targets = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp=teacher_temp)
            self.dino_loss.update_center(cls_logits)
            patch_targets = None
            if patch_logits is not None:
                patch_targets = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp=teacher_temp)
                # [M, 1, K]: every masked token counts once in the global mean, however the tokens are
                # split over ranks (the official code averages per-rank means, which depends on the split).
                self.ibot_patch_loss.update_center(patch_logits.unsqueeze(1))
        else:
            cls_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp=teacher_temp)
            patch_targets = None
            if patch_logits is not None:
                patch_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    patch_logits, teacher_temp=teacher_temp, n_masked_patches_tensor=batch.n_masked_patches
                )
        cls_targets = cls_targets.view(N_GLOBAL_CROPS, -1, cls_targets.shape[-1])
        monitors = {
            # Collapse to one prototype: batch-mean entropy -> 0; uniform collapse: per-sample entropy -> log K.
            "teacher_entropy": _entropy(cls_targets.float()).mean(),
            "teacher_batch_entropy": _entropy(cls_targets.float().flatten(0, 1).mean(0)),
            "dino_center_norm": self.dino_loss.center.norm(),
        }
        return cls_targets, patch_targets, monitors

    # ------------------------------------------------------------------ student + losses
    def forward(self, batch: SSLBatch, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (to backpropagate) and a dict of detached loss terms and collapse monitors."""
        return self._loss(self.normalized(batch), teacher_temp)

    def _loss(self, batch: SSLBatch, teacher_temp: float, mask_student: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on a normalised batch; ``mask_student=False`` (distillation): the student sees the
        unmasked crops, and the iBOT loss runs on the patches ``batch.mask_indices`` names."""
        cls_targets, patch_targets, monitors = self._teacher_targets(batch, teacher_temp)
        crops, crop_masks = [batch.global_crops], [batch.masks if mask_student else None]
        if self.n_local_crops > 0:  # crops.local_crops_number=0 trains on the global crops only
            crops.append(batch.local_crops)
            crop_masks.append(None)
        outs = self.student.backbone(crops, masks=crop_masks, is_training=True)
        global_out = outs[0]
        global_cls = global_out["x_norm_clstoken"]
        head_inputs = {"global": global_cls}
        if self.n_local_crops > 0:
            head_inputs = {"local": outs[1]["x_norm_clstoken"], **head_inputs}
        masked_patches = None
        if self.do_ibot:
            masked_patches = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch.mask_indices)
            if not self.ibot_separate_head:
                head_inputs["patch"] = masked_patches
        # One head call on all tokens that share the DINO head.
        head_out = dict(zip(head_inputs, self.student.dino_head(torch.cat(list(head_inputs.values()))).split(
            [t.shape[0] for t in head_inputs.values()])))
        local_logits, global_logits = head_out.get("local"), head_out["global"]
        if self.do_ibot:
            patch_logits = head_out["patch"] if not self.ibot_separate_head else self.student.ibot_head(masked_patches)

        n_loss_terms = (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS + self.n_local_crops * N_GLOBAL_CROPS
        terms: dict[str, Tensor] = {}
        total = global_cls.new_zeros(())
        if self.n_local_crops > 0:
            terms["dino_local_crops_loss"] = self.dino_loss(
                local_logits.chunk(self.n_local_crops), list(cls_targets.unbind(0))
            ) / n_loss_terms
            total = total + self.cfg.dino.loss_weight * terms["dino_local_crops_loss"]
        if self.do_dino:
            # Both global crops in one term (the teacher order is swapped), counted twice.
            terms["dino_global_crops_loss"] = self.dino_loss([global_logits], [cls_targets.flatten(0, 1)]) * 2 / n_loss_terms
            total = total + self.cfg.dino.loss_weight * terms["dino_global_crops_loss"]
        if self.do_koleo:
            koleo = self.cfg.dino.koleo_loss_weight * sum(self.koleo_loss(p) for p in global_cls.chunk(N_GLOBAL_CROPS))
            terms["koleo_loss"] = koleo / N_GLOBAL_CROPS
            total = total + koleo
        if self.do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(
                patch_logits, patch_targets, student_masks_flat=batch.masks,
                n_masked_patches=patch_logits.shape[0], masks_weight=batch.masks_weight,
            )
            terms["ibot_loss"] = ibot / N_GLOBAL_CROPS
            total = total + self.cfg.ibot.loss_weight * ibot

        with torch.no_grad():
            normalised = F.normalize(global_cls.float(), dim=-1)
            monitors["student_feature_std"] = normalised.std(dim=0).mean()
            monitors["ibot_center_norm"] = self.ibot_patch_loss.center.norm()
        logs = {k: v.detach() for k, v in {**terms, **monitors}.items()}
        logs["total_loss"] = total.detach()
        return total, logs

    # ------------------------------------------------------------------ EMA
    @property
    def ema_model(self) -> nn.ModuleDict:
        """What ``update_teacher`` moves towards the student, and the run's final model: the teacher here, the
        student's own EMA in distillation (dinov2/train/distillation.py)."""
        return self.teacher

    @torch.no_grad()
    def update_teacher(self, momentum: float | Tensor) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, on local shards (no gather).

        ``momentum`` may be a 0-dim tensor on the device: the trainer passes 1 for a skipped step
        without a host sync. Parameter lists are built once (FSDP2 keeps its local shards)."""
        if getattr(self, "_ema_pairs", None) is None:
            teacher_params, student_params = [], []
            for name in self.ema_model.keys():
                for t, s in zip(self.ema_model[name].parameters(), self.student[name].parameters()):
                    teacher_params.append(t.to_local() if hasattr(t, "to_local") else t)
                    student_params.append(s.to_local() if hasattr(s, "to_local") else s)
            self._ema_pairs = (teacher_params, student_params)
        teacher_params, student_params = self._ema_pairs
        weight = 1.0 - momentum
        if isinstance(weight, Tensor):
            torch._foreach_lerp_(teacher_params, student_params, [weight] * len(teacher_params))
        else:
            torch._foreach_lerp_(teacher_params, student_params, weight)

    def loss_centers(self) -> list[Tensor]:
        """The loss buffers the forward pass updates (DINO and iBOT centers)."""
        return [self.dino_loss.center, self.ibot_patch_loss.center]
