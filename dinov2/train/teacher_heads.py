"""Heads for a distillation teacher released without them (an exported file, a hub backbone).

The DINO head ends in an L2 normalisation and a weight-normalised linear layer: its logits are the
cosine similarities of a projected feature to K unit prototypes, so training the head clusters the
features online (DINO as clustering; SwAV makes this explicit). For a frozen teacher whose head was
not kept, the same targets come from clustering the teacher's own features offline:

    logits_k(x) = < (x - mu) / |x - mu| , c_k >,   c_k = spherical k-means centroids of (x_i - mu) / |x_i - mu|

over the teacher's class tokens (DINO head) and patch tokens (iBOT head; both together when the
student shares one head), computed on augmented global crops of the training data before the first
step. It needs no training, no extra hyper-parameters beyond K (the student's prototype count) and is
deterministic given the seed; the logits have the scale of a DINO head's (cosines), so the teacher
temperature schedule applies unchanged. ``random`` draws the prototypes at random instead (the
baseline the README measures this against).

The k-means is written in torch (a few matrix products per iteration) so that it runs on the
teacher's device, CUDA or CPU, without FAISS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PrototypeHead(nn.Module):
    """Frozen teacher head: cosine similarity of the centred feature to ``n_prototypes`` unit prototypes.

    ``fit_on``: which teacher tokens the prototypes are fitted on (``("cls",)``, ``("patch",)`` or both)."""

    def __init__(self, in_dim: int, n_prototypes: int, fit_on: tuple[str, ...]) -> None:
        super().__init__()
        self.fit_on = tuple(fit_on)
        self.mean = nn.Parameter(torch.zeros(in_dim), requires_grad=False)
        # Zero until fitted (every logit 0: uniform targets), set by dinov2.train.distillation.fit_teacher_heads.
        self.prototypes = nn.Parameter(torch.zeros(n_prototypes, in_dim), requires_grad=False)

    @property
    def n_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x - self.mean, dim=-1) @ F.normalize(self.prototypes, dim=-1).t()


def spherical_kmeans(points: Tensor, k: int, iterations: int, generator: torch.Generator,
                     chunk_rows: int = 65536) -> Tensor:
    """``k`` unit centroids of the unit rows of ``points`` ``[n, d]`` maximising the summed cosine to the
    nearest centroid (Dhillon & Modha, 2001). Initialised on ``k`` distinct rows drawn with ``generator``
    (a CPU generator); an emptied cluster restarts on the row currently worst served."""
    n = points.shape[0]
    if n < k:
        raise ValueError(f"k-means of {n} points into {k} clusters: at least {k} points are needed")
    points = F.normalize(points.float(), dim=-1)
    start = torch.randperm(n, generator=generator)[:k].to(points.device)
    centroids = points[start].clone()
    for _ in range(iterations):
        best_sim = torch.empty(n, device=points.device)
        labels = torch.empty(n, dtype=torch.long, device=points.device)
        for lo in range(0, n, chunk_rows):
            best_sim[lo:lo + chunk_rows], labels[lo:lo + chunk_rows] = (points[lo:lo + chunk_rows] @ centroids.t()).max(1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            worst = best_sim.argsort()[:empty.numel()]
            sums[empty] = points[worst]
        centroids = F.normalize(sums, dim=-1)
    return centroids


@torch.no_grad()
def fit_prototypes(head: PrototypeHead, features: Tensor, method: str, iterations: int, seed: int) -> dict:
    """``{mean, prototypes, points, used_prototypes}`` for ``head``: the features' mean, and the spherical
    k-means centroids of the centred features (``kmeans``) or random unit vectors (``random``)."""
    generator = torch.Generator().manual_seed(seed)
    mean = features.float().mean(0)
    centred = F.normalize(features.float() - mean, dim=-1)
    k = head.n_prototypes
    if method == "kmeans":
        prototypes = spherical_kmeans(centred, k, iterations, generator)
    elif method == "random":
        prototypes = F.normalize(torch.randn(k, features.shape[1], generator=generator), dim=-1).to(features.device)
    else:
        raise ValueError(f"teacher head method {method!r}: choose kmeans or random")
    assigned = (centred @ prototypes.t()).argmax(1)
    return {"mean": mean, "prototypes": prototypes, "points": features.shape[0],
            "used_prototypes": int(torch.unique(assigned).numel())}


@torch.no_grad()
def target_statistics(targets: Tensor, labels: Tensor | None = None) -> dict[str, float]:
    """How much a teacher's target distributions ``[N, K]`` (rows sum to 1) tell the student, in nats:

    * ``entropy``: mean per-sample entropy H(p_i) (the floor of the cross-entropy loss the student can reach);
    * ``marginal_entropy``: H(mean_i p_i) (how many prototypes the batch spreads over);
    * ``information``: their difference, the mutual information I(image; prototype) of the soft assignment;
    * ``label_information``: I(label; prototype) = H(mean p) - sum_y P(y) H(mean of p over label y), when
      ``labels`` are given (at most ln of the number of classes).

    ``benchmarks/distill_targets.py`` measures the heads of a distillation teacher with it."""
    p = targets.double()

    def entropy(q: Tensor) -> Tensor:
        return -(q * q.clamp_min(1e-300).log()).sum(-1)

    marginal = entropy(p.mean(0))
    stats = {"entropy": float(entropy(p).mean()), "marginal_entropy": float(marginal)}
    stats["information"] = stats["marginal_entropy"] - stats["entropy"]
    if labels is not None:
        classes, counts = labels.unique(return_counts=True)
        conditional = sum(float(c) / len(labels) * float(entropy(p[labels == y].mean(0))) for y, c in zip(classes, counts))
        stats["label_information"] = float(marginal) - conditional
    return stats
