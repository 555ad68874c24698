"""Sequence packing: crops of different token counts share one flat token tensor.

All student crops (2 global + N local, different lengths) run through the backbone as one
``[T, D]`` tensor so that every linear layer (qkv, proj, MLP) is a single large matmul and no
padding is ever computed. Only attention needs to know where one image's tokens end; that
knowledge lives in a :class:`PackLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackLayout:
    """Groups of equal-length sequences, in packing order: ``((batch, tokens), ...)``.

    The derived sizes are plain fields computed once in ``__post_init__`` (not cached properties:
    those take a lock on Python <= 3.11 and break ``torch.compile`` graphs).
    """

    groups: tuple[tuple[int, int], ...]
    total_tokens: int = field(init=False, compare=False, repr=False)
    offsets: tuple[int, ...] = field(init=False, compare=False, repr=False)  # start of each group
    # One entry per image, as xformers' ``BlockDiagonalMask.from_seqlens`` wants.
    sequence_lengths: tuple[int, ...] = field(init=False, compare=False, repr=False)
    max_tokens: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a PackLayout needs at least one (batch, tokens) group")
        groups = tuple((int(batch), int(tokens)) for batch, tokens in self.groups)
        for batch, tokens in groups:
            if batch < 1 or tokens < 1:
                raise ValueError(f"group sizes must be positive, got (batch={batch}, tokens={tokens})")
        sizes = [batch * tokens for batch, tokens in groups]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "total_tokens", sum(sizes))
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "sequence_lengths", tuple(t for b, t in groups for _ in range(b)))
        object.__setattr__(self, "max_tokens", max(t for _, t in groups))

    @classmethod
    def dense(cls, batch: int, tokens: int) -> "PackLayout":
        return cls(((batch, tokens),))

    def cumulative_lengths(self, device: torch.device | None = None) -> Tensor:
        """``[images + 1]`` int32 start offsets of every image and the total, as varlen kernels want.

        Built on ``device`` from ``arange`` (no host list copied to the device, so no sync).
        """
        pieces = [torch.zeros(1, dtype=torch.int32, device=device)]
        for (batch, tokens), start in zip(self.groups, self.offsets):
            pieces.append(torch.arange(1, batch + 1, dtype=torch.int32, device=device) * tokens + start)
        return torch.cat(pieces)

    def split(self, packed: Tensor) -> list[Tensor]:
        """``[T, ...]`` -> one ``[batch, tokens, ...]`` view per group."""
        self._check(packed)
        sizes = [b * n for b, n in self.groups]
        return [
            chunk.view(b, n, *packed.shape[1:])
            for chunk, (b, n) in zip(torch.split(packed, sizes, dim=0), self.groups)
        ]

    def _check(self, packed: Tensor) -> None:
        if packed.shape[0] != self.total_tokens:
            raise ValueError(
                f"packed tensor has {packed.shape[0]} tokens but the layout {self.groups} "
                f"describes {self.total_tokens}"
            )

    def block_diagonal_mask(self, device: torch.device | None = None) -> Tensor:
        """Boolean ``[T, T]`` mask, True where attention is allowed (same image)."""
        images = [torch.arange(batch, device=device)[:, None].expand(batch, tokens).reshape(-1) + first
                  for (batch, tokens), first in zip(self.groups, self._first_image_of_group())]
        image_of_token = torch.cat(images)
        return image_of_token[:, None] == image_of_token[None, :]

    def _first_image_of_group(self) -> list[int]:
        return [sum(b for b, _ in self.groups[:i]) for i in range(len(self.groups))]

    def token_indices_of_images(self, images_per_group: Sequence[Tensor]) -> tuple[Tensor, "PackLayout"]:
        """Flat token indices of a subset of images in each group, and the subset's layout.

        ``images_per_group[g]`` holds image indices (within group g) to keep, in the order
        they should appear in the subset.
        """
        pieces, groups = [], []
        for (batch, tokens), start, images in zip(self.groups, self.offsets, images_per_group):
            token_range = torch.arange(tokens, device=images.device)
            pieces.append((start + images[:, None] * tokens + token_range[None, :]).flatten())
            groups.append((int(images.numel()), tokens))
        return torch.cat(pieces), PackLayout(tuple(groups))


def pack(sequences: Sequence[Tensor]) -> tuple[Tensor, PackLayout]:
    """``[B_i, N_i, D]`` tensors -> ``([sum B_i N_i, D], layout)``."""
    if len(sequences) == 0:
        raise ValueError("pack() needs at least one tensor")
    for i, seq in enumerate(sequences):
        if seq.dim() != 3:
            raise ValueError(f"tensor {i} to pack must be [batch, tokens, dim], got shape {tuple(seq.shape)}")
    layout = PackLayout(tuple((int(s.shape[0]), int(s.shape[1])) for s in sequences))
    return torch.cat([s.flatten(0, 1) for s in sequences], dim=0), layout


def as_packed(x: Tensor, layout: PackLayout | None) -> tuple[Tensor, PackLayout, torch.Size | None]:
    """Accept a dense ``[B, N, D]`` batch or packed ``[T, D]`` tokens with their layout.

    Returns packed tokens, their layout and the dense shape to restore (None if none).
    """
    if x.dim() == 3:
        return x.flatten(0, 1), PackLayout.dense(x.shape[0], x.shape[1]), x.shape
    if layout is None:
        raise ValueError("packed [T, D] input needs a PackLayout")
    return x, layout, None
