"""Collectives over an explicit process group; ``group=None`` means one process, and then they do nothing.

The one definition of "distributed" is a process group handed in: the trainer's
``DistributedEnv.process_group`` (None for one process), passed to the losses, the checkpoint manager
and these helpers. Nothing here looks up the default group.

Every rank must take the same branch around a collective (skip a step, stop with an error), or the
others wait in the next collective until the timeout: :func:`raise_if_any_rank_failed` makes such a
decision global first.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist


def all_reduce_(tensor: torch.Tensor, group: dist.ProcessGroup | None, op=None, async_op: bool = False):
    """In-place all-reduce (sum by default) of ``tensor`` over ``group``; nothing without a group.

    Returns the async work handle when ``async_op`` and a collective was issued, else None. With one
    process the tensor already holds the global value: this is what lets the losses run without
    ``init_process_group``.
    """
    if group is None:
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group, async_op=async_op)


def all_gather_objects(value, group: dist.ProcessGroup | None) -> list:
    """Every rank's picklable ``value``, in rank order of ``group``; ``[value]`` without a group."""
    if group is None:
        return [value]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def raise_if_any_rank_failed(error: BaseException | None, what: str, group: dist.ProcessGroup | None = None) -> None:
    """Raise on every rank of ``group`` (naming the ranks that failed and their messages) if any rank failed.

    Called where a rank could fail alone (its own view of a shared directory, its checkpoint read),
    so that the others do not wait in the next collective.
    """
    if group is None:
        if error is not None:
            raise error
        return
    errors = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}", group)
    failed = {rank: message for rank, message in enumerate(errors) if message is not None}
    if not failed:
        return
    if error is not None and len(failed) == 1:
        raise error
    detail = "; ".join(f"rank {rank}: {message}" for rank, message in failed.items())
    raise RuntimeError(f"{what} failed on {len(failed)} of {len(errors)} ranks: {detail}")


def mean_over_ranks(values: Mapping[str, torch.Tensor | float], device: torch.device,
                    group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Average scalar logs over the ranks of ``group`` (one all-reduce), so metrics describe the global batch."""
    keys = list(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(device).reshape(()) for k in keys])
    if group is not None:
        dist.all_reduce(stacked, group=group)
        stacked /= dist.get_world_size(group)
    return dict(zip(keys, stacked.tolist()))
