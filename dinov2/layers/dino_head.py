"""DINO / iBOT projection head.

Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO),
sec. 3.1 and appendix: an MLP (hidden 2048, GELU) down to a bottleneck (256), an L2
normalisation, then a weight-normalised linear layer to K prototypes,

    h(x) = W_last(z / ||z||),  W_last = g * v / ||v||  (row-wise, Salimans & Kingma 2016),

with the magnitude g fixed to 1 at initialisation (DINO freezes it; DINOv2 keeps it
trainable but starts from 1). The same head shape is used for the iBOT patch head
(Zhou et al., 2022). Names follow the official ``dinov2.layers.DINOHead``.

Weight normalisation uses ``torch.nn.utils.parametrizations.weight_norm``: the parameters
are ``last_layer.parametrizations.weight.original0`` (g, ``[out_dim, 1]``) and
``...original1`` (v, ``[out_dim, bottleneck_dim]``), ordinary leaf parameters that FSDP2
``fully_shard`` shards like any other and whose names contain ``last_layer`` (the
"freeze last layer" schedule sets their learning rate to 0, found by name). Checkpoints written with the
deprecated API (``last_layer.weight_g`` / ``weight_v``, e.g. official DINOv2 training
checkpoints) load through torch's compatibility hook.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.init import trunc_normal_
from torch.nn.utils.parametrizations import weight_norm

from .initialization import InitStep, construction_steps, post_order


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> weight-normalised linear layer to ``out_dim`` prototypes.

    Args:
        in_dim: backbone feature size.
        out_dim: number of prototypes K.
        use_bn: BatchNorm1d after each hidden linear layer.
        nlayers: linear layers in the MLP (``nlayers == 1``: one ``in_dim -> bottleneck``).
        hidden_dim: MLP hidden size.
        bottleneck_dim: size of the normalised embedding fed to the last layer.
        mlp_bias: biases in the MLP linear layers (the last layer never has one).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim=hidden_dim, use_bn=use_bn, bias=mlp_bias)
        # Same order as the official constructor (mlp init, then the last layer keeps
        # nn.Linear's default init for v), so a given seed gives the same weights.
        self.mlp.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1)

    def init_steps(self) -> list[InitStep]:
        """The constructor's random draws, in order (see ``dinov2.layers.initialization``): the MLP's
        default init, its truncated-normal init, then the last layer's default (kaiming) ``v`` and ``g = 1``."""
        linears = [m for m in post_order(self.mlp) if isinstance(m, nn.Linear)]
        return (construction_steps(self.mlp) + [(m, _init_linear) for m in linears]
                + [(self.last_layer.parametrizations.weight, _init_weight_norm)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # 1e-12 underflows to 0 in float16, which would give 0 / 0 for a zero embedding.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def _init_weight_norm(parametrization: nn.Module) -> None:
    nn.init.kaiming_uniform_(parametrization.original1, a=math.sqrt(5))  # nn.Linear's default, for v
    parametrization.original0.fill_(1)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)
