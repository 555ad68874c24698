"""Explicit, stateless random streams for the data pipeline.

Every random decision the data pipeline makes (epoch permutations, crop parameters,
mask shapes) is drawn from a generator derived from ``(seed, stream, key...)`` so
that it is a pure function of the run seed and the global sample position. That is
what makes resume exact without checkpointing worker RNG states, and it keeps the
process-global RNGs (``random``, ``np.random``, ``torch``) untouched.
"""

from __future__ import annotations

import random
from typing import Sequence, Union

import numpy as np
import torch

# Stream tags keep the different consumers of a position statistically independent:
# the crops of sample p and the masks of the batch starting at p must not share draws.
STREAM_EPOCH = 0
STREAM_AUGMENT = 1
STREAM_MASK = 2
STREAM_MASK_SHAPE = 4  # one iBOT mask of a global batch (3 is the DataLoader's worker seeding)
STREAM_TEACHER_PATCHES = 5  # the patch tokens of image p a distillation teacher's k-means heads are fitted on

RNGLike = Union[np.random.Generator, random.Random]


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that is a pure, well-mixed function of ``(seed, *keys)``.

    SeedSequence hashes its entropy, so neighbouring positions get unrelated streams
    (a plain ``seed + position`` would make run seed 1 / position 0 collide with run
    seed 0 / position 1).
    """
    entropy = [int(seed)] + [int(k) for k in keys]
    if any(v < 0 for v in entropy):
        raise ValueError(f"seed and keys must be non-negative integers, got {entropy}")
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    # 63 bits: valid for torch.Generator.manual_seed and numpy alike.
    return (int(state[0]) << 31) ^ int(state[1])


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from ``derive_seed(seed, *keys)``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator seeded from ``derive_seed(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


# --- adaptors: code below accepts either a numpy Generator or a random.Random ---------


def rng_uniform(rng: RNGLike, low: float, high: float) -> float:
    """Uniform float between low and high, like random.uniform.

    ``high < low`` is allowed (the masking generator relies on it when the remaining
    budget is below the minimum block area), unlike numpy's ``uniform``.
    """
    if isinstance(rng, np.random.Generator):
        return low + (high - low) * float(rng.random())
    if isinstance(rng, random.Random):
        return rng.uniform(low, high)
    raise TypeError(f"rng must be a numpy.random.Generator or random.Random, got {type(rng).__name__}")


def rng_randint(rng: RNGLike, low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends inclusive (like random.randint)."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    raise TypeError(f"rng must be a numpy.random.Generator or random.Random, got {type(rng).__name__}")


def rng_permutation(rng: RNGLike, n: int) -> Sequence[int]:
    """A uniformly random permutation of range(n)."""
    if isinstance(rng, np.random.Generator):
        return [int(i) for i in rng.permutation(n)]
    if isinstance(rng, random.Random):
        order = list(range(n))
        rng.shuffle(order)
        return order
    raise TypeError(f"rng must be a numpy.random.Generator or random.Random, got {type(rng).__name__}")
