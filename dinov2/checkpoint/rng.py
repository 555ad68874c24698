"""Per-rank RNG states in checkpoints, and what a rank gets when the checkpoint has none for it.

What draws from the process-global RNGs during training is per rank (stochastic depth), so each
rank saves its own state under its own key, ``rng.rank_{r}`` (DCP would keep only one copy of a
key that every rank saves). Resuming on the same world size restores every rank bitwise.

Resuming on a different world size: ranks that exist in the checkpoint restore their state;
a rank that does not (rank 2 of 4 resuming a 2-rank checkpoint) seeds its RNGs from
``(train.seed, step, rank)``. That is deterministic, so such a resume is itself reproducible,
but it cannot reproduce draws a different number of ranks would have made. The data pipeline
does not use these RNGs: crops, masks and sample order are functions of the global sample
position and continue exactly on any world size.
"""

from __future__ import annotations

import torch

from dinov2.seeding import derive_seed

# Stream tags for derive_seed, distinct from the data pipeline's (0-4).
STREAM_RANK = 100
STREAM_RESUMED_RANK = 101


def rank_key(rank: int) -> str:
    return f"rank_{rank}"


def get_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank of a multi-rank run its own stream (after every rank built the same weights)."""
    torch.manual_seed(derive_seed(seed, STREAM_RANK, rank))


def seed_resumed_rank(seed: int, step: int, rank: int) -> None:
    """RNGs of a rank that has no saved state in the checkpoint it resumes from (see module doc)."""
    torch.manual_seed(derive_seed(seed, STREAM_RESUMED_RANK, step, rank))
