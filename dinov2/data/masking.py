"""Block-wise patch masking for iBOT (the BEiT scheme DINOv2 uses).

A mask is grown by stamping random rectangles of random area and log-uniform aspect
ratio until the requested number of patches is masked or no rectangle makes progress.
Same algorithm and constants as the official dinov2 ``MaskingGenerator``; the only
difference is that randomness comes from an explicit ``rng`` argument instead of the
global ``random`` module, so masks are reproducible per batch and workers never
share a hidden stream.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np

from dinov2.seeding import RNGLike, rng_randint, rng_uniform

# Attempts per rectangle before giving up on this round (official value).
_ATTEMPTS_PER_BLOCK = 10


class MaskingGenerator:
    """Generate boolean (H, W) block-wise masks over a patch grid.

    Args:
        input_size: patch-grid size, an int (square) or an (H, W) tuple.
        num_masking_patches: default target count, used when ``__call__`` gets none.
        min_num_patches: smallest area of a single rectangle.
        max_num_patches: largest area of a single rectangle (defaults to
            ``num_masking_patches``, or the whole grid when that is None too).
        min_aspect / max_aspect: aspect-ratio range (h / w), sampled log-uniformly;
            ``max_aspect`` defaults to ``1 / min_aspect``.
    """

    def __init__(
        self,
        input_size: Union[int, Tuple[int, int]],
        num_masking_patches: Optional[int] = None,
        min_num_patches: int = 4,
        max_num_patches: Optional[float] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
    ):
        if not isinstance(input_size, (tuple, list)):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = num_masking_patches if num_masking_patches is not None else self.num_patches
        self.max_num_patches = max_num_patches
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, block area [{self.min_num_patches}, "
            f"{self.max_num_patches}], default target {self.num_masking_patches}, "
            f"log aspect [{self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}])"
        )

    def get_shape(self) -> Tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: RNGLike) -> int:
        """Stamp one rectangle adding at most ``max_mask_patches`` new patches.

        Returns how many patches became masked (0 when every attempt failed).
        """
        delta = 0
        for _ in range(_ATTEMPTS_PER_BLOCK):
            target_area = rng_uniform(rng, self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng_uniform(rng, *self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            # Strict inequalities as in the official code: a block never spans the grid.
            if w < self.width and h < self.height:
                top = rng_randint(rng, 0, self.height - h)
                left = rng_randint(rng, 0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                # Only accept blocks that add something without overshooting the budget.
                if 0 < new <= max_mask_patches:
                    window[...] = True
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches: Optional[int] = 0, rng: Optional[RNGLike] = None) -> np.ndarray:
        """A bool (H, W) mask with at most ``num_masking_patches`` True entries.

        ``rng`` (numpy Generator or random.Random) is required whenever patches are
        requested; nothing here touches global RNG state.
        """
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches or 0
        mask = np.zeros(self.get_shape(), dtype=bool)
        if num_masking_patches <= 0:
            return mask
        if rng is None:
            raise ValueError("MaskingGenerator needs an explicit rng (numpy Generator or random.Random)")
        mask_count = 0
        while mask_count < num_masking_patches:
            budget = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._add_block(mask, budget, rng)
            if delta == 0:  # no rectangle fits the remaining budget: stop, as upstream
                break
            mask_count += delta
        return mask
