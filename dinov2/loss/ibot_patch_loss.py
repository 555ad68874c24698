"""iBOT masked-image-modelling loss on patch tokens (patch-level objective).

Zhou et al., 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", eq. 2: for the
patches masked in the student's input, the student predicts the teacher's distribution
for the same, unmasked patch,

    L_MIM = - sum_i m_i * sum_k P_t(u_i)[k] * log softmax(g_s(u_hat_i) / tau_s)[k].

DINOv2 (Oquab et al., 2023, sec. 4) averages the masked patches of each image (weight
``1 / n_masked(image)``, so every image counts the same whatever its mask ratio) and
averages over images. Teacher targets are centered with a patch center or produced by
Sinkhorn-Knopp over all masked patches of the global batch (``dinov2.loss.centering``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .centering import TeacherCentering, sinkhorn_knopp


def _sum_teacher_log_student(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Per-token ``sum_k t[k] * log softmax(s / tau_s)[k]`` (the negative cross-entropy).

    float32: log-probabilities at tau_s = 0.1 lose too much in bf16 / fp16.
    """
    lsm = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return torch.sum(teacher_probs.float() * lsm, dim=-1)


class iBOTPatchLoss(TeacherCentering):
    """Patch-token cross-entropy between student (masked input) and teacher.

    Args:
        patch_out_dim: number of patch prototypes K (iBOT head output size).
        student_temp: student softmax temperature ``tau_s``.
        center_momentum: EMA momentum of the ``center`` buffer ``[1, 1, patch_out_dim]``.
        process_group: the ranks whose global batch centers and Sinkhorn sums cover (None: one process).
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 process_group: Optional[dist.ProcessGroup] = None):
        super().__init__((1, 1, patch_out_dim), center_momentum, process_group)
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((tokens - center) / teacher_temp, -1)``, same shape as the input."""
        return self._softmax_center_teacher(teacher_patch_tokens, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Union[Tensor, int],
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp targets for this process's masked patches ``[M_local, K]``.

        ``n_masked_patches_tensor`` (this process's number of masked patches; processes may hold
        different counts) is kept for the official signature but not needed: the assignments do not
        depend on the global sample count (see ``sinkhorn_knopp``), so no count is moved to the device
        or all-reduced. The caller's tensor is not modified.
        """
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations, process_group=self.process_group)

    def forward(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, student_masks_flat: Tensor) -> Tensor:
        """Loss on full token grids.

        Args:
            student_patch_tokens: ``[B, N, K]`` student logits.
            teacher_patch_tokens: ``[B, N, K]`` teacher target distributions.
            student_masks_flat: ``[B, N]`` mask (True where the student input was masked).
        Returns:
            ``- mean_b (sum_{n masked} loss[b, n]) / max(n_masked(b), 1)``.
        """
        loss = _sum_teacher_log_student(teacher_patch_tokens, student_patch_tokens, self.student_temp)
        masks = student_masks_flat.float()
        loss = torch.sum(loss * masks, dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: Optional[int] = None,
        masks_weight: Optional[Tensor] = None,
    ) -> Tensor:
        """Loss on the masked tokens only, gathered in row-major order of the mask.

        Args:
            student_patch_tokens_masked: ``[M, K]`` student logits of masked tokens (may be
                padded beyond ``n_masked_patches``).
            teacher_patch_tokens_masked: ``[M, K]`` teacher target distributions.
            student_masks_flat: ``[B, N]`` boolean masks; gives the number of images B and,
                when ``masks_weight`` is None, each token's weight.
            n_masked_patches: if given, only the first ``n_masked_patches`` tokens count.
            masks_weight: ``[n_masked]`` per-token weights; default ``1 / n_masked(image)``.
        Returns:
            ``- sum_i w_i * sum_k t_i[k] log softmax(s_i / tau_s)[k] / B``.
        """
        loss = _sum_teacher_log_student(teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            masks = student_masks_flat.bool()
            per_image = 1 / masks.sum(dim=-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(masks)[masks]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        """EMA of the teacher patch-token mean into ``center``.

        ``[B, N, K]``: the batch center is the mean over images of each image's token mean
        (as in the official code); ``[M, K]`` (e.g. gathered masked tokens) counts as one
        sequence, i.e. the mean over its M tokens.
        """
        self._update_center(teacher_patch_tokens)

    def _center_statistics(self, teacher_patch_tokens: Tensor) -> tuple[Tensor, int]:
        tokens = teacher_patch_tokens.float()
        if tokens.ndim == 2:
            tokens = tokens.unsqueeze(0)
        return tokens.mean(dim=1).sum(dim=0), tokens.shape[0]
