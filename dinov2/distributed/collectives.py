"""Small agreements between ranks that the trainer needs; all are no-ops without a process group.

Every rank must take the same branch around a collective (skip a step, stop with an error), or
the others wait in the next collective until the timeout. These helpers make the decision
global first.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def raise_if_any_rank_failed(error: BaseException | None, what: str) -> None:
    """Raise on every rank (naming the ranks that failed and their messages) if any rank failed.

    Called where a rank could fail alone (its own view of a shared directory, its checkpoint read),
    so that the others do not wait in the next collective.
    """
    if not _active():
        if error is not None:
            raise error
        return
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    failed = {rank: message for rank, message in enumerate(errors) if message is not None}
    if not failed:
        return
    if error is not None and len(failed) == 1:
        raise error
    detail = "; ".join(f"rank {rank}: {message}" for rank, message in failed.items())
    raise RuntimeError(f"{what} failed on {len(failed)} of {len(errors)} ranks: {detail}")


def mean_over_ranks(values: Mapping[str, torch.Tensor | float], device: torch.device) -> dict[str, float]:
    """Average scalar logs over ranks (one all-reduce), so metrics describe the global batch."""
    keys = list(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(device).reshape(()) for k in keys])
    if _active():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))
