"""Atomic, sharded training checkpoints on torch.distributed.checkpoint (DCP).

A checkpoint is a directory ``step_{N:09d}`` holding DCP shards. It is written under a
temporary name and renamed only when complete, so a run killed during a save still has the
previous checkpoint; the last ``keep_last`` are kept. DCP works without a process group (one
process) and with one (each rank writes its shards), and reloads on another world size.

With ``async_save`` the state is staged to CPU memory and written by a background thread
(``dcp.async_save``, on a gloo group of its own so its collectives never interleave with the
training's); the rename happens at the next save or at ``wait()``. At most one save is in flight.

Failures: a save that fails (disk full, a quota, a read-only directory) removes its partial
directory and raises :class:`CheckpointSaveError` naming the directory; the older checkpoints are
untouched. A checkpoint whose state held NaN/inf is marked (``NONFINITE``) and is never the one
called good; ``keep_last`` never deletes the newest good checkpoint. A checkpoint that cannot be
read (truncated or missing shard, damaged ``.metadata``) raises :class:`CheckpointReadError`, so
the trainer can fall back to an older one. Nothing is unpickled unchecked (see ``metadata.py``): a
crafted file raises :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dinov2.state_dicts import key_mismatches
from dinov2.checkpoint.metadata import read_metadata, safe_load

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{9})$")
_PARTIAL = re.compile(r"^\.step_(\d{9})\.partial$")
NONFINITE = "NONFINITE"  # marker file: the saved state held NaN/inf values


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by another architecture or config."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the partial save was removed, older checkpoints are intact."""


# DCP raises CheckpointException, a BaseException, for failures on any rank: catch it with these.
DCP_ERRORS = (Exception, CheckpointException)


def _quiet():
    # DCP warns on every call without a process group; that is our normal single-process mode.
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.filterwarnings("ignore", message=".*process group.*")
    warnings.filterwarnings("ignore", message=".*torch.distributed is.*")
    return context


def is_good(path: str | Path) -> bool:
    """True for a checkpoint whose saved state was finite."""
    return not (Path(path) / NONFINITE).exists()


def check_fits(state: dict[str, Any], metadata, path: str | Path, sections: Iterable[str] = ("model",)) -> None:
    """Raise :class:`CheckpointMismatchError` naming every missing, unexpected or mis-shaped tensor of
    the flat ``state[section]`` dicts (e.g. ``state["model"]``) against the checkpoint."""
    problems = []
    for section in sections:
        prefix = f"{section}."
        saved = {k[len(prefix):]: getattr(v, "size", None) for k, v in metadata.state_dict_metadata.items()
                 if k.startswith(prefix)}
        wanted = {k: getattr(v, "shape", None) for k, v in state.get(section, {}).items()}
        problems += [f"{section}: {p}" for p in key_mismatches(wanted, saved, found_name="checkpoint", wanted_name="run")]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by another architecture or config: " + "; ".join(problems)
        )


class CheckpointManager:
    """Checkpoints of one run. ``process_group``: the ranks that save together (None: one process);
    passed by the trainer, never looked up."""

    def __init__(self, directory: str | Path, keep_last: int = 3, async_save: bool = False,
                 process_group: dist.ProcessGroup | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self.group = process_group
        self._collective = process_group is not None and dist.get_world_size(process_group) > 1
        self._is_rank_zero = process_group is None or dist.get_rank(process_group) == 0
        self._pending: tuple[Path, Path, Future] | None = None
        # new_group is collective: every rank constructs the manager at the same point.
        self._async_group = dist.new_group(backend="gloo") if async_save and process_group is not None else None

    def _barrier(self) -> None:
        if self._collective:
            dist.barrier(group=self.group)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints in this process's view of the directory, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and (path / ".metadata").exists():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def candidates(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, newest first, as rank 0 sees them: broadcast, so all ranks try the
        same ones even where a shared filesystem shows a new rename late (collective)."""
        found = [list(reversed(self.checkpoints()))]
        if self._collective:
            dist.broadcast_object_list(found, src=dist.get_global_rank(self.group, 0), group=self.group)
        return found[0]

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint (collective, see ``candidates``)."""
        found = self.candidates()
        return found[0] if found else None

    def latest_good(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint whose state was finite (this process's view)."""
        good = [(step, path) for step, path in self.checkpoints() if is_good(path)]
        return good[-1] if good else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any], *, finite: bool = True) -> Path:
        """Write ``state`` as ``step_{step}`` (collective). Returns the final path; with async_save it
        appears when the background write completes (see ``wait``). ``finite=False`` marks a state that
        held NaN/inf (kept for inspection, never called good)."""
        self.wait()
        final = self.directory / f"step_{step:09d}"
        temporary = self.directory / f".step_{step:09d}.partial"
        if self._is_rank_zero:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise CheckpointSaveError(f"cannot create the checkpoint directory {self.directory}: {error}") from None
            shutil.rmtree(temporary, ignore_errors=True)
        self._barrier()
        context = _quiet()
        try:
            if self.async_save:
                future = dcp.async_save(state, checkpoint_id=str(temporary), process_group=self._async_group)
                self._pending = (temporary, final, future, finite)
                return final
            dcp.save(state, checkpoint_id=str(temporary), process_group=self.group)
        except DCP_ERRORS as error:
            self._abandon(temporary, error)
        finally:
            context.__exit__(None, None, None)
        self._publish(temporary, final, finite)
        return final

    def wait(self) -> None:
        """Finish an in-flight async save: wait for the write, then publish it (collective)."""
        if self._pending is None:
            return
        temporary, final, future, finite = self._pending
        self._pending = None
        try:
            future.result()
        except DCP_ERRORS as error:
            self._abandon(temporary, error)
        self._publish(temporary, final, finite)

    def _abandon(self, temporary: Path, error: BaseException) -> None:
        if self._is_rank_zero:
            shutil.rmtree(temporary, ignore_errors=True)
        detail = str(error).strip().splitlines()
        raise CheckpointSaveError(
            f"could not write a checkpoint in {self.directory} ({type(error).__name__}: "
            f"{(detail[-1] if detail else '')[:300]}); is the disk full? The partial save was removed and the "
            f"older checkpoints are intact."
        ) from None

    def _publish(self, temporary: Path, final: Path, finite: bool = True) -> None:
        self._barrier()  # every rank has written its shards (rank 0 wrote .metadata last)
        if self._is_rank_zero:
            if not finite:
                (temporary / NONFINITE).write_text("the saved state held NaN/inf values\n")
            if final.exists():
                shutil.rmtree(final)
            temporary.rename(final)  # atomic on one filesystem: a checkpoint is whole or absent
            good = self.latest_good()
            for _, old in self.checkpoints()[: -self.keep_last]:
                if good is None or old != good[1]:  # the newest good checkpoint is never deleted
                    shutil.rmtree(old, ignore_errors=True)
            for stale in self.directory.iterdir():  # left by runs killed during a save
                if _PARTIAL.match(stale.name):
                    shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        logger.info("saved checkpoint %s", final)

    # ------------------------------------------------------------------ load
    def load(self, state: dict[str, Any], path: str | Path, strict_sections: Iterable[str] = ("model",)) -> None:
        """Fill ``state`` (same structure as saved; tensors are loaded in place) from ``path``.

        Every key of ``state`` must be in the checkpoint (ask only for what it has, see
        ``read_metadata``); for ``strict_sections`` the checkpoint must also hold nothing more, and
        shapes must agree: otherwise a :class:`CheckpointMismatchError` names the keys.
        """
        path = Path(path)
        check_fits(state, read_metadata(path), path, strict_sections)
        context = _quiet()
        try:
            safe_load(state, path, process_group=self.group)
        finally:
            context.__exit__(None, None, None)
