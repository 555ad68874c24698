"""DINO self-distillation loss on the class token (image-level objective).

Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO),
eq. 2-3: the student is trained to predict the teacher's target distribution for every
pair of views,

    L = sum_{s in student views} sum_{t in teacher views} H(P_t, P_s),
    H(P_t, P_s) = - mean_i sum_k P_t[i, k] * log softmax(g_s(x_i) / tau_s)[k],

where the teacher targets ``P_t`` come from centering + sharpening or from Sinkhorn-Knopp
(DINOv2, Oquab et al., 2023, sec. 4; see ``dinov2.loss.centering``). As in the official
DINOv2 code the pairs are summed, not averaged; the trainer chooses the normalisation, and
the caller excludes same-view pairs by what it passes in.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .centering import TeacherCentering, sinkhorn_knopp


class DINOLoss(TeacherCentering):
    """Class-token cross-entropy between student and teacher distributions.

    Args:
        out_dim: number of prototypes K (DINO head output size).
        student_temp: student softmax temperature ``tau_s``.
        center_momentum: EMA momentum ``m`` of the ``center`` buffer ``[1, out_dim]``.
        process_group: the ranks whose global batch centers and Sinkhorn sums cover (None: one process).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 process_group: Optional[dist.ProcessGroup] = None):
        super().__init__((1, out_dim), center_momentum, process_group)
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((teacher_output - center) / teacher_temp, -1)``; applies a pending update first."""
        return self._softmax_center_teacher(teacher_output, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp targets ``[B_local, K]`` over the global batch ``B_local * world_size``."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations, process_group=self.process_group)

    def forward(
        self, student_output_list: Sequence[Tensor], teacher_out_softmaxed_centered_list: Sequence[Tensor]
    ) -> Tensor:
        """Sum over all (student, teacher) pairs of the batch-mean cross-entropy.

        Args:
            student_output_list: student logits, each ``[B, K]``.
            teacher_out_softmaxed_centered_list: teacher target distributions, each ``[B, K]``.
        """
        total_loss = 0
        for s in student_output_list:
            # float32: log-probabilities at tau_s = 0.1 lose too much in bf16 / fp16.
            lsm = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total_loss = total_loss - torch.sum(t * lsm, dim=-1).mean()
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """EMA of the global batch mean of ``teacher_output`` ``[B, K]`` into ``center``."""
        self._update_center(teacher_output)

    def _center_statistics(self, teacher_output: Tensor) -> tuple[Tensor, int]:
        rows = teacher_output.reshape(-1, teacher_output.shape[-1])
        return rows.float().sum(dim=0), rows.shape[0]
