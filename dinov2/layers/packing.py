"""Sequence packing: crops of different token counts share one flat token tensor.

All student crops (2 global + N local, different lengths) run through the backbone as one
``[T, D]`` tensor so that every linear layer (qkv, proj, MLP) is a single large matmul and no
padding is ever computed. Only attention needs to know where one image's tokens end; that
knowledge lives in a :class:`PackLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackLayout:
    """Groups of equal-length sequences, in packing order: ``((batch, tokens), ...)``."""

    groups: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a PackLayout needs at least one (batch, tokens) group")
        for batch, tokens in self.groups:
            if batch < 1 or tokens < 1:
                raise ValueError(f"group sizes must be positive, got (batch={batch}, tokens={tokens})")

    @classmethod
    def dense(cls, batch: int, tokens: int) -> "PackLayout":
        return cls(((batch, tokens),))

    @cached_property
    def total_tokens(self) -> int:
        return sum(b * n for b, n in self.groups)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each group in the flat token dimension."""
        starts, position = [], 0
        for batch, tokens in self.groups:
            starts.append(position)
            position += batch * tokens
        return tuple(starts)

    @cached_property
    def sequence_lengths(self) -> list[int]:
        """One entry per image, as xformers' ``BlockDiagonalMask.from_seqlens`` wants."""
        return [tokens for batch, tokens in self.groups for _ in range(batch)]

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
        image_of_token = torch.repeat_interleave(
            torch.arange(len(self.sequence_lengths), device=device),
            torch.tensor(self.sequence_lengths, device=device),
        )
        return image_of_token[:, None] == image_of_token[None, :]

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
