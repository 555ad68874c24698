import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT); ``gamma`` as in DINOv2 checkpoints."""

    def __init__(self, dim: int, init_values: float | Tensor = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``gamma = init_values``: the constructor's init, replayed after a meta-device build
        (``dinov2.layers.initialization.construction_steps``)."""
        with torch.no_grad():
            self.gamma.copy_(torch.as_tensor(self.init_values, dtype=self.gamma.dtype).expand_as(self.gamma))

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
