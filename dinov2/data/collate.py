"""The training batch: ``SSLBatch``, and ``SSLCollate`` that builds it from one rank's samples.

This module owns the two rules a batch is made by:
* slots: the global crops of a global batch of W*B samples are ordered crop-major as on one
  rank (slot ``c * W*B + offset`` for crop c of the sample at ``position - batch_start``), so a
  sample's slot does not depend on which rank holds it (``RankLayout`` decides that);
* masks: the official iBOT rule applied to the whole global batch (``global_batch_masks``),
  every draw seeded from (seed, batch_start), so the masks of a global batch are the same
  however many ranks share it and a resumed run rebuilds them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .masking import MaskingGenerator
from dinov2.seeding import STREAM_MASK, STREAM_MASK_SHAPE, numpy_rng, rng_uniform
from .ssl_dataset import Sample


@dataclass(frozen=True)
class SSLBatch:
    """What the model reads from one rank's batch (crop-major: all first crops, then all second ones)."""

    global_crops: Tensor  # [n_global * B, C, H, W], NOT normalised: uint8 0-255, or float as the dataset gave it
    local_crops: Tensor  # [n_local * B, C, h, w] likewise; [0, C, 0, 0] without local crops
    masks: Tensor  # [n_global * B, n_tokens] bool, iBOT masks of the global crops (all False: none drawn, e.g. distilling)
    mask_indices: Tensor  # [M] long, flat indices of the True entries of ``masks``
    masks_weight: Tensor  # [M] float32, 1 / (masked count of its crop) for each masked patch
    n_masked_patches: Tensor  # [1] long, M

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "SSLBatch":
        return SSLBatch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "SSLBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SSLBatch":
        """Page-locked copies (called by DataLoader(pin_memory=True)) so ``to(cuda, non_blocking=True)``
        is an asynchronous copy."""
        return self._map(lambda t: t.pin_memory())


class SSLCollate:
    """Picklable ``collate_fn``: one rank's ``Sample``s of a global batch -> ``(SSLBatch, skipped)``,
    ``skipped`` being the dataset indices of the unreadable files passed over to fill the batch."""

    def __init__(self, seed: int, global_batch_size: int, mask_ratio_tuple: Tuple[float, float] = (0.1, 0.5),
                 mask_probability: float = 0.5, mask_generator: Optional[MaskingGenerator] = None,
                 n_tokens: Optional[int] = None):
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = float(mask_probability)
        self.mask_generator = mask_generator
        self.n_tokens = _check_masking(mask_probability, n_tokens, mask_generator)

    def __call__(self, samples: Sequence[Sample]) -> Tuple[SSLBatch, Tuple[int, ...]]:
        batch_start = samples[0].key.batch_start
        offsets = [s.key.position - batch_start for s in samples]
        if any(s.key.batch_start != batch_start for s in samples) or not all(
                0 <= o < self.global_batch_size for o in offsets):
            raise ValueError(f"samples at positions {[s.key.position for s in samples]} are not all in the global "
                             f"batch [{batch_start}, {batch_start + self.global_batch_size})")
        global_crops, local_crops = _stack_crops([s.crops for s in samples])
        n_global = len(global_crops) // len(samples)
        slots = [c * self.global_batch_size + o for c in range(n_global) for o in offsets]

        def rng_for(mask: Optional[int]) -> np.random.Generator:
            if mask is None:
                return numpy_rng(self.seed, STREAM_MASK, batch_start)
            return numpy_rng(self.seed, STREAM_MASK_SHAPE, batch_start, mask)

        masks = global_batch_masks(slots, n_global * self.global_batch_size, self.mask_ratio_tuple,
                                   self.mask_probability, self.n_tokens, self.mask_generator, rng_for)
        skipped = tuple(sorted({index for s in samples for index in s.skipped}))
        return _assemble(global_crops, local_crops, masks, self.n_tokens), skipped


def global_batch_masks(
    slots: Sequence[int],
    n_images: int,
    mask_ratio_tuple: Tuple[float, float],
    mask_probability: float,
    n_tokens: int,
    mask_generator: Optional[MaskingGenerator],
    rng_for: Callable[[Optional[int]], np.random.Generator],
) -> List[Tensor]:
    """Masks of the global crops at ``slots`` of a global batch of ``n_images`` global crops.

    The official rule applied to the whole global batch: ``int(n_images * mask_probability)``
    crops are masked, the k-th drawing its ratio from the k-th of that many equal bins of
    ``mask_ratio_tuple`` (float32 bin edges and int() truncations as in the official code), and a
    random permutation decides which slot gets which bin. Only the permutation is drawn for the
    whole global batch (``rng_for(None)``, a few ms for 10^5 crops); the mask of bin k is drawn
    from its own stream ``rng_for(k)``, so each rank builds just the masks of its own crops and
    the result does not depend on how the batch is split. Returns one flat bool mask per slot.
    """
    n_masked_images = int(n_images * mask_probability)
    bins = rng_for(None).permutation(n_images) if n_masked_images > 0 else None
    probs = torch.linspace(float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]), n_masked_images + 1)
    empty = torch.zeros(n_tokens, dtype=torch.bool)
    masks = []
    for slot in slots:
        if not 0 <= slot < n_images:
            raise ValueError(f"mask slot {slot} is outside the global batch of {n_images} crops")
        k = int(bins[slot]) if bins is not None else n_masked_images
        if k >= n_masked_images:
            masks.append(empty.clone())
            continue
        rng = rng_for(k)
        lo, hi = probs[k], probs[k + 1]
        ratio = lo + (hi - lo) * rng_uniform(rng, 0.0, 1.0)
        masks.append(_as_flat_bool(mask_generator(int(n_tokens * ratio), rng=rng), n_tokens))
    return masks


def _check_masking(mask_probability: float, n_tokens: Optional[int],
                   mask_generator: Optional[MaskingGenerator]) -> int:
    """The number of patch tokens per global crop, after checking the masking arguments agree."""
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if mask_probability > 0 and mask_generator is None:
        raise ValueError("a mask_generator is required when mask_probability > 0")
    if n_tokens is None:
        n_tokens = mask_generator.num_patches if mask_generator is not None else 0
    if mask_generator is not None and mask_generator.num_patches != n_tokens:
        raise ValueError(f"n_tokens={n_tokens} does not match the mask grid {mask_generator.get_shape()}")
    return int(n_tokens)


def _stack_crops(crops: Sequence[dict]) -> Tuple[Tensor, Tensor]:
    """``(global [n_global*B, C, H, W], local [n_local*B, C, h, w])`` in crop-major order (all first
    crops, then all second ones): the model splits the batch back per crop with chunk()."""
    n_global, n_local = len(crops[0]["global_crops"]), len(crops[0]["local_crops"])
    global_crops = _stack([c["global_crops"][i] for i in range(n_global) for c in crops])
    if n_local > 0:
        local_crops = _stack([c["local_crops"][i] for i in range(n_local) for c in crops])
    else:
        local_crops = global_crops.new_empty((0, global_crops.shape[1], 0, 0))
    return global_crops, local_crops


def _stack(tensors: List[Tensor]) -> Tensor:
    """``torch.stack`` into a contiguous (N, C, H, W) tensor, whatever the crops' memory layout."""
    out = torch.empty((len(tensors),) + tuple(tensors[0].shape), dtype=tensors[0].dtype)
    return torch.stack(tensors, out=out)


def _assemble(global_crops: Tensor, local_crops: Tensor, masks: List[Tensor], n_tokens: int) -> SSLBatch:
    collated_masks = torch.stack(masks) if masks else torch.zeros((0, n_tokens), dtype=torch.bool)
    mask_indices = collated_masks.flatten().nonzero().flatten()
    row_counts = collated_masks.sum(-1).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / row_counts).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return SSLBatch(global_crops=global_crops, local_crops=local_crops, masks=collated_masks,
                    mask_indices=mask_indices, masks_weight=masks_weight,
                    n_masked_patches=torch.full((1,), fill_value=mask_indices.shape[0], dtype=torch.long))


def _as_flat_bool(mask: np.ndarray, n_tokens: int) -> Tensor:
    flat = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).flatten()
    if flat.numel() != n_tokens:
        raise ValueError(f"mask generator returned {flat.numel()} patches, expected n_tokens={n_tokens}")
    return flat
