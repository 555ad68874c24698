"""Read DCP checkpoints without running code from them.

A DCP checkpoint's ``.metadata`` file is a pickle, and ``torch.distributed.checkpoint`` reads it
with ``pickle.load``: a crafted file runs whatever it names. Here it goes through a restricted
unpickler that builds only the classes DCP metadata is made of (``ALLOWED_GLOBALS``: the set that
files written by ``dcp.save`` for our trainer state name, single-process and FSDP2-sharded, read
from a recording unpickler; tests/test_security_loading.py re-checks it on the installed torch)
and refuses anything else with an error naming the file and the class. A pickle that tries to
set attributes on an allowed class is refused too, and the change undone.

``SafeFileSystemReader`` is a ``dcp.FileSystemReader`` that reads metadata that way and loads
every non-tensor ("bytes") item of the shard files with ``torch.load(weights_only=True)``
(DCP's default planner would unpickle those without restriction); tensors are already read with
``weights_only=True`` by DCP itself. ``safe_load(state, path)`` is ``dcp.load`` through it, with
every failure (refused, truncated, missing shard, mismatch) raised as one
:class:`CheckpointReadError` (an ``Exception``) naming the file or the checkpoint, rather than
DCP's ``CheckpointException`` (a ``BaseException`` whose text is a traceback dump).
"""

from __future__ import annotations

import importlib
import io
import os
import pathlib
import pickle
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo

from dinov2.load_errors import describe, weights_only_refusal

METADATA_FILE = ".metadata"

# Instances of these classes are what a metadata pickle builds (NEWOBJ + BUILD): dataclasses
# that only hold values, with no behaviour on construction.
_DCP_CLASSES = tuple(
    getattr(_md, name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta")
    if hasattr(_md, name)
) + (_StorageInfo,)

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {(cls.__module__, cls.__qualname__) for cls in _DCP_CLASSES}
    | {
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),  # Enum of TensorProperties
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # layout by name: a dict lookup
        ("collections", "OrderedDict"),
        # StorageMeta.checkpoint_id is the path the checkpoint was saved to.
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
    }
    # dtypes (torch.float32 ...), layouts (torch.strided) and memory formats are pickled by name.
    | {("torch", name) for name, value in vars(torch).items()
       if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))}
)


# Python-level classes a pickle could name, whose attributes it could therefore try to set.
_MUTABLE_CLASSES = tuple(
    cls for cls in (*_DCP_CLASSES, _md._MEM_FORMAT_ENCODING, pathlib.PurePath, pathlib.Path, pathlib.PosixPath,
                    pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)
)


def _restore_classes(before: dict[type, dict[str, Any]]) -> list[str]:
    """Undo any change a pickle made to an allowed class; return the names of the changed ones."""
    tampered = []
    for cls, state in before.items():
        now = dict(vars(cls))
        if now == state:
            continue
        tampered.append(cls.__qualname__)
        for key in now.keys() - state.keys():
            type.__delattr__(cls, key)
        for key, value in state.items():
            if now.get(key, object()) is not value:
                type.__setattr__(cls, key, value)
    return tampered


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read: missing, truncated, corrupt or not DCP metadata."""


class UnsafeCheckpointError(CheckpointReadError):
    """A checkpoint file that names a class or function outside the allowed list (crafted, or not DCP)."""


def _allowed_object(module: str, name: str) -> Any:
    if module == "torch.serialization" and name == "_get_layout":
        # Layout by name: a lookup in a table of our own (a builtin method, nothing to tamper with).
        return {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}.__getitem__
    return getattr(importlib.import_module(module), name)


def _class_state() -> dict[type, dict[str, Any]]:
    return {cls: dict(vars(cls)) for cls in _MUTABLE_CLASSES}


class _RestrictedUnpickler(pickle.Unpickler):
    """C unpickler whose globals come from ``ALLOWED_GLOBALS`` only. A pickle can still ask to set
    attributes of an allowed class (BUILD on the class object); ``load_metadata_stream`` detects
    that, undoes it and refuses the file. Only allowed callables can ever be called."""

    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                f"{self.source}: refused to unpickle {module}.{name}: DCP checkpoint metadata holds only "
                "torch.distributed.checkpoint metadata classes, torch sizes and dtypes (the file is "
                "crafted, or not DCP metadata); nothing from it was run"
            )
        return _allowed_object(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source}: refused a persistent id: not DCP checkpoint metadata")


def load_metadata_stream(stream: IO[bytes], source: str):
    """Unpickle DCP metadata from ``stream`` through the restricted unpickler; ``source`` names it in errors."""
    before = _class_state()
    try:
        metadata = _RestrictedUnpickler(stream, source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # EOFError, UnpicklingError, ... of a truncated or foreign file
        raise CheckpointReadError(
            f"{source}: not readable DCP checkpoint metadata (truncated or corrupt: {type(error).__name__}: {error})"
        ) from error
    finally:
        tampered = _restore_classes(before)
    if tampered:
        raise UnsafeCheckpointError(
            f"{source}: refused: the pickle tried to change the class(es) {', '.join(tampered)} "
            "(crafted file; the change was undone)"
        )
    if not isinstance(metadata, _md.Metadata):
        raise CheckpointReadError(f"{source}: holds a {type(metadata).__name__}, not DCP checkpoint metadata")
    return metadata


def read_metadata(path: str | os.PathLike):
    """DCP metadata of a checkpoint directory (or of its ``.metadata`` file), read without running
    code: ``.state_dict_metadata`` maps each flattened key (``model.teacher.backbone.cls_token``,
    ``rng.rank_0.torch``...) to its size and dtype."""
    path = Path(path)
    file = path if path.name == METADATA_FILE and path.is_file() else path / METADATA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {METADATA_FILE})")
    with open(file, "rb") as stream:
        return load_metadata_stream(stream, str(file))


def checkpoint_failure(error: BaseException) -> BaseException:
    """What went wrong inside a DCP call: DCP wraps every rank's exception (ours included) in a
    ``CheckpointException``, a ``BaseException`` whose text is a traceback dump; this returns the
    first rank's original exception (``error`` itself when it is not such a wrapper)."""
    failures = getattr(error, "failures", None) if isinstance(error, CheckpointException) else None
    if failures:
        return next(iter(failures.values()))[0]
    return error


class _WeightsOnlyBytes:
    """A load planner seen through a filter: each non-tensor item is unpickled with
    ``weights_only=True`` (plain containers, numbers, strings, tensors) and handed to the planner
    re-serialised from those values, so the planner's own unrestricted ``torch.load`` only ever
    sees what the restricted load built."""

    def __init__(self, planner, reader: "SafeFileSystemReader") -> None:
        self._planner = planner
        self._reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        info = self._reader.storage_data[read_item.storage_index]
        source = os.path.join(str(self._reader.path), info.relative_path)
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = weights_only_refusal(error)
            if reason is not None:
                failure = UnsafeCheckpointError(
                    f"{source}: refused to unpickle item {read_item.dest_index.fqn!r} ({reason}); checkpoint items "
                    "may only hold tensors, numbers, strings and containers of them; nothing from it was run")
            else:
                failure = CheckpointReadError(
                    f"{source}: item {read_item.dest_index.fqn!r} is corrupt ({describe(error)})")
            self._reader.failure = failure
            raise failure from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


class SafeFileSystemReader(dcp.FileSystemReader):
    """``dcp.FileSystemReader`` that never unpickles unchecked: restricted metadata, weights-only items.
    ``failure`` keeps the first refusal or corruption it met (DCP re-wraps what it raises)."""

    failure: CheckpointReadError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        if rank is not None and hasattr(self, "_get_metadata_path"):  # per-rank metadata (torch >= 2.9)
            path = self._get_metadata_path(rank)
        else:
            path = self.fs.concat_path(self.path, METADATA_FILE)
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = load_metadata_stream(stream, str(path))
            except CheckpointReadError as error:
                self.failure = self.failure or error
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = _md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _WeightsOnlyBytes(planner, self))


def safe_load(state: dict[str, Any], path: str | os.PathLike, **dcp_kwargs: Any) -> None:
    """``dcp.load(state, ...)`` through :class:`SafeFileSystemReader`: tensors are filled in place,
    other items replaced. Any failure is raised as :class:`CheckpointReadError` (an ``Exception``)
    naming the file, or the checkpoint and the cause; refusals as :class:`UnsafeCheckpointError`."""
    reader = SafeFileSystemReader(str(path))
    try:
        dcp.load(state, storage_reader=reader, **dcp_kwargs)
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        cause = reader.failure or checkpoint_failure(error)
        if isinstance(cause, CheckpointReadError):
            raise cause from None
        raise CheckpointReadError(f"checkpoint {path} could not be loaded: {describe(cause)}") from None
