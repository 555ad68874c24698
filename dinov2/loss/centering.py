"""Teacher targets shared by the DINO and iBOT losses: centering and Sinkhorn-Knopp.

DINOv2 (Oquab et al., 2023, "DINOv2: Learning Robust Visual Features without
Supervision", sec. 4) turns teacher logits into target distributions in one of two ways:

* softmax centering (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision
  Transformers", sec. 3.1 and eq. 4): subtract an EMA ``c`` of the batch mean of the
  teacher logits, then sharpen with a low temperature,
  ``P_t = softmax((g_t(x) - c) / tau_t)``, ``c <- m c + (1 - m) mean_i g_t(x_i)``;
* Sinkhorn-Knopp (Caron et al., 2020, "Unsupervised Learning of Visual Features by
  Contrasting Cluster Assignments" (SwAV), sec. 3.1 and appendix A.1): the equipartitioned
  soft assignment ``Q = Diag(u) exp(S / tau) Diag(v)`` whose prototype marginals are
  uniform over the global batch, found by alternately normalising prototype ("row" in
  the paper's K x B notation) and sample ("column") sums.

Both need sums over the *global* batch: over the ranks of the ``process_group`` each loss is
given (the trainer's ``DistributedEnv.process_group``). ``process_group=None`` means one process:
nothing is all-reduced and ``torch.distributed`` is never touched. The default group is never
looked up.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.collectives import all_reduce_

__all__ = [
    "softmax_center",
    "sinkhorn_knopp",
    "TeacherCentering",
]


# ---------------------------------------------------------------------------------------
# Teacher target maths (pure functions)
# ---------------------------------------------------------------------------------------
def softmax_center(teacher_logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """DINO centering + sharpening: ``softmax((teacher_logits - center) / temp, -1)``.

    ``center`` broadcasts against ``teacher_logits``; it is kept in float32, so low
    precision logits are promoted to float32 (as in the official code).
    """
    return F.softmax((teacher_logits - center) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temp: float,
    n_iterations: int = 3,
    n_samples: Optional[Union[int, Tensor]] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> Tensor:
    """Sinkhorn-Knopp soft assignments of samples to prototypes (SwAV, appendix A.1).

    Args:
        teacher_logits: ``[B_local, K]`` scores of this process's samples for K prototypes.
        temp: temperature; ``P = exp(teacher_logits / temp)``.
        n_iterations: number of (prototype, sample) normalisation rounds.
        n_samples: number of samples ``B`` in the global batch. Accepted for compatibility with the
            official signature; the result does not depend on it (see below), so it is not used.
        process_group: the ranks that hold the rest of the global batch (None: this process holds all of it).

    Returns:
        ``[B_local, K]`` float32 assignments: each sample's row sums to 1 and, at the
        fixed point, each prototype receives ``B / K`` of the global mass.

    In the paper's K x B notation (``Q = P.T``) every round makes the rows (prototypes) sum
    to 1/K -- sums all-reduced over processes, because a prototype's mass is spread over the
    whole global batch -- then the columns (samples) sum to 1/B, which is local; a final
    ``* B`` turns columns into distributions. Every step multiplies Q by a diagonal matrix, so
    ``Q = Diag(u) E Diag(v)`` with ``E = exp(logits / temp)``, and the rounds only update the
    vectors: ``v = 1 / (u^T E)`` (prototype sums, all-reduced), ``u = 1 / (E v)`` (sample sums).
    The constants 1/K, 1/B and the initial 1/sum(E) scale u or v by a number that the next
    normalisation cancels, and the last sample normalisation followed by ``* B`` makes each row
    sum to 1 exactly, so they are dropped (v is rescaled to mean 1 instead, which pins the free
    scale between u and v without changing the result): E is written once, read twice per round (two
    matrix-vector products), and scaled once at the end, instead of ~9 full passes per round.
    There is no host synchronisation and, without a process group, no graph break.
    """
    # exp(logit / temp) overflows float32 once the ratio exceeds ~88 (temp is 0.04-0.07).
    # Subtracting a constant only rescales E, but it must be the same constant on every rank,
    # because prototype sums mix ranks: use the global max.
    if teacher_logits.numel() > 0:
        shift = teacher_logits.max().float().reshape(1)
    else:  # a rank may hold no sample (e.g. no masked patch); it must still join collectives
        shift = teacher_logits.new_full((1,), float("-inf"), dtype=torch.float32)
    all_reduce_(shift, process_group, op=dist.ReduceOp.MAX)
    E = teacher_logits - shift  # one pass, promoted to float32 by the float32 shift
    E.div_(temp).exp_()  # in (0, 1]

    u = E.new_ones(E.shape[0])
    v = E.new_ones(E.shape[1])
    tiny = torch.finfo(E.dtype).tiny  # a prototype no sample reaches keeps weight 0 instead of 0 / 0
    for _ in range(n_iterations):
        per_prototype = torch.mv(E.t(), u)  # paper: row sums, global
        all_reduce_(per_prototype, process_group)
        v = per_prototype.clamp_min(tiny).reciprocal()
        v = v / v.mean()  # fixes the free scale between u and v (identical on every rank: v is global)
        u = torch.mv(E, v).clamp_min(tiny).reciprocal()  # paper: column sums, local
    return E.mul_(v[None, :]).mul_(u[:, None])


# ---------------------------------------------------------------------------------------
# EMA center shared by DINOLoss and iBOTPatchLoss
# ---------------------------------------------------------------------------------------
class TeacherCentering(nn.Module):
    """Holds the ``center`` buffer and its EMA update; base of DINOLoss / iBOTPatchLoss.

    ``center <- m * center + (1 - m) * batch_center`` (DINO, eq. 4), where the batch center
    is the mean over the global batch. The update can be split as in the official code to
    overlap the all-reduce with the student forward: ``reduce_center_update`` launches an
    async all-reduce and ``apply_center_update`` (called automatically by the next
    ``softmax_center_teacher``) waits and applies it. ``update_center`` does both at once;
    used in the usual order (center the teacher, then update) it gives exactly the same
    targets as the split form, and the buffer is always current (checkpoints included).

    The per-process sum and count are reduced together in one tensor, so the mean is exact
    even when processes hold different numbers of samples (the official code divides by
    ``local_count * world_size``; identical for equal shards).

    ``process_group``: the ranks over which the batch is global (None: one process, no collective).
    """

    def __init__(self, center_shape: tuple, center_momentum: float, process_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.center_momentum = center_momentum
        self.process_group = process_group  # the ranks of the global batch; None: one process
        self.register_buffer("center", torch.zeros(center_shape))
        # (summed stats [D + 1], async handle or None) between reduce and apply; transient
        # by design, never part of the state dict.
        self._pending: Optional[tuple] = None

    @torch.no_grad()
    def reset_center(self) -> None:
        """Zero center and no pending update, as after construction (e.g. after ``to_empty``)."""
        self._pending = None
        self.center.zero_()

    def _center_statistics(self, teacher_output: Tensor) -> tuple[Tensor, int]:
        """Local ``(sum of per-sample vectors [D], number of samples)``; see subclasses."""
        raise NotImplementedError

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: Tensor) -> None:
        """Start the center update: local statistics + async all-reduce (if distributed)."""
        self.apply_center_update()  # an older pending update must land first
        local_sum, count = self._center_statistics(teacher_output)
        # float32: a float16 all-reduce of sums over a large batch can overflow.
        stats = torch.cat([local_sum.float().reshape(-1), local_sum.new_full((1,), count, dtype=torch.float32)])
        handle = all_reduce_(stats, self.process_group, async_op=True)
        self._pending = (stats, handle)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Finish a pending ``reduce_center_update`` (no-op when none is pending)."""
        if self._pending is None:
            return
        stats, handle = self._pending
        self._pending = None
        if handle is not None:
            handle.wait()
        batch_center = (stats[:-1] / stats[-1]).to(self.center).view_as(self.center)
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1 - m)

    @torch.no_grad()
    def _update_center(self, teacher_output: Tensor) -> None:
        self.reduce_center_update(teacher_output)
        self.apply_center_update()

    @torch.no_grad()
    def _softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        self.apply_center_update()
        # Broadcast over the last dim only, so the output keeps the input's shape.
        return softmax_center(teacher_output, self.center.reshape(-1), teacher_temp)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A checkpoint taken between reduce and apply must not lose the reduced batch.
        self.apply_center_update()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The loaded center supersedes an update computed before the load.
        if self._pending is not None and self._pending[1] is not None:
            self._pending[1].wait()
        self._pending = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
