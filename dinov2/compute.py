"""Devices and dtypes by name: the one place where a config or CLI string becomes a ``torch.device``
or a ``torch.dtype`` (training, FSDP, evaluation and the benchmarks all read these)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_AUTOCAST = ("fp32", "off")  # the names that mean "no mixed precision"


class DeviceError(RuntimeError):
    """The requested device does not exist here."""


def autocast_dtype(name: str) -> torch.dtype | None:
    """``compute.precision`` / ``--autocast`` -> the autocast dtype, or None for full precision."""
    return None if name in NO_AUTOCAST else DTYPES[name]


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``compute.device`` / ``--device`` for this process: ``auto``/``cuda`` -> the local rank's GPU (or the
    only visible one, when the launcher gives each task its own), ``auto`` without CUDA -> the CPU."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None:
        name = "auto"
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device {name} was asked for but CUDA is not available here; use cpu or auto")
        return device
    if not torch.cuda.is_available():
        if name == "cuda":
            raise DeviceError("device cuda was asked for but CUDA is not available here; use cpu or auto")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank < count:
        return torch.device("cuda", local_rank)
    raise DeviceError(
        f"local rank {local_rank} but only {count} GPUs are visible: start one task per GPU "
        f"(--gpus-per-node / --nproc-per-node must not exceed the GPUs of a node)"
    )


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` (``compute.num_threads``) for the duration, then restored;
    ``None`` leaves it alone. Used by the entry points around a run, never inside library objects."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
