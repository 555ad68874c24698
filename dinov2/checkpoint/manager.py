"""Atomic, sharded training checkpoints on torch.distributed.checkpoint (DCP).

A checkpoint is a directory ``step_{N:09d}`` holding DCP shards. It is written under a
temporary name and renamed only when complete, so a run killed during a save still has the
previous checkpoint; the last ``keep_last`` are kept. DCP works without a process group (one
process) and with one (each rank writes its shards), and reloads on another world size.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{9})$")


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _quiet():
    # DCP warns on every call without a process group; that is our normal single-process mode.
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.filterwarnings("ignore", message=".*process group.*")
    warnings.filterwarnings("ignore", message=".*torch.distributed is.*")
    return context


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and (path / ".metadata").exists():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        final = self.directory / f"step_{step:09d}"
        temporary = self.directory / f".step_{step:09d}.partial"
        if _is_rank_zero():
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
        _barrier()
        context = _quiet()
        try:
            dcp.save(state, checkpoint_id=str(temporary))
        finally:
            context.__exit__(None, None, None)
        _barrier()
        if _is_rank_zero():
            if final.exists():
                shutil.rmtree(final)
            temporary.rename(final)  # atomic on one filesystem: a checkpoint is whole or absent
            for _, old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        logger.info("saved checkpoint %s", final)
        return final

    def load(self, state: dict[str, Any], path: str | Path) -> None:
        """Fill ``state`` (same structure as saved; tensors are loaded in place) from ``path``."""
        path = Path(path)
        if not (path / ".metadata").exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata)")
        context = _quiet()
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as error:
            raise RuntimeError(f"checkpoint {path} does not fit this run: {error}".splitlines()[0][:2000]) from error
        finally:
            context.__exit__(None, None, None)
