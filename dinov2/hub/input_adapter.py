"""Feed a described backbone from a pipeline that prepares ImageNet-normalised RGB tensors.

Curation (and other tools written for the released models) resize, crop and normalise every
image with the ImageNet statistics. A backbone trained with other statistics or on grayscale
input (its description says so) gets what it was trained on through this wrapper: the affine
normalisation is undone and redone exactly; RGB becomes gray by PIL's luma weights (as
``Image.convert("L")``, without its rounding to 8 bits).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .description import BackboneDescription

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's RGB -> L


class FromImageNetRGB(nn.Module):
    """``model`` taking ImageNet-normalised RGB ``[B, 3, H, W]``; attributes of ``model`` stay reachable."""

    def __init__(self, model: nn.Module, description: BackboneDescription) -> None:
        super().__init__()
        if description.in_chans not in (1, 3):
            raise ValueError(f"a {description.in_chans}-channel backbone cannot take RGB images")
        self.model = model
        self.embed_dim = getattr(model, "embed_dim", None)
        self.register_buffer("rgb_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mean", torch.tensor(description.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(description.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        self.gray = description.in_chans == 1

    def forward(self, x: Tensor) -> Tensor:
        pixels = x * self.rgb_std + self.rgb_mean  # back to [0, 1]
        if self.gray:
            pixels = (pixels * self.luma).sum(dim=1, keepdim=True)
        return self.model((pixels - self.mean) / self.std)


def from_imagenet_rgb(model: nn.Module, description: BackboneDescription) -> nn.Module:
    """``model`` itself when it was trained on ImageNet-normalised RGB, else wrapped."""
    d = description
    if d.in_chans == 3 and tuple(d.mean) == IMAGENET_MEAN and tuple(d.std) == IMAGENET_STD:
        return model
    return FromImageNetRGB(model, description).eval()
