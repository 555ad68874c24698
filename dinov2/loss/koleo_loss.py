"""KoLeo regulariser: spread the features uniformly over the unit sphere.

Sablayrolles et al., 2019, "Spreading vectors for similarity search" (ICLR), sec. 3.2:
the Kozachenko-Leonenko differential-entropy estimator gives, for L2-normalised features
x_1..x_n,

    L_koleo = - (1 / n) * sum_i log(rho_{n,i}),   rho_{n,i} = min_{j != i} ||x_i - x_j||,

which DINOv2 (Oquab et al., 2023, sec. 4) adds to the class-token objective (weight 0.1,
computed per global crop within each process's batch). On the unit sphere the nearest
neighbour in Euclidean distance is the one with the largest inner product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def nearest_neighbour_indices(x: Tensor) -> Tensor:
    """For each row of L2-normalised ``x`` ``[n, D]``, the index of its nearest other row."""
    dots = x @ x.t()
    # -inf, not -1: a row must never be its own neighbour, even when all its inner
    # products are -1 (antipodal points).
    dots.fill_diagonal_(float("-inf"))
    return dots.argmax(dim=1)


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropic regulariser (Sablayrolles et al., 2019)."""

    def __init__(self):
        super().__init__()
        # Fixed eps as in the official code: ||x - y + eps|| > 0, so the log stays finite
        # (and its gradient too) when two rows are identical.
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        """``-mean_i log(||x_i - x_nn(i)|| + eps)`` for ``x = normalize(student_output)`` ``[n, D]``, n >= 2."""
        # Distances between close unit vectors cancel catastrophically in bf16 / fp16.
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            with torch.no_grad():
                indices = nearest_neighbour_indices(x)
            distances = self.pdist(x, x[indices])
            return -torch.log(distances + eps).mean()
