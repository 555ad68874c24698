"""The run directory: one run at a time, and a fresh start never mixes with an old run.

* ``prepare_output_dir``: rank 0 creates it, every rank checks it sees it writable (a shared filesystem).

* ``RunLock``: an exclusive ``flock`` on ``RUN_DIR/.lock`` held by rank 0 for the life of the run.
  The kernel drops it when the process dies (``kill -9`` included), so a stale lock never blocks a
  restart; a second run in the same directory fails at once naming the holder (host, pid, start).
* ``archive_previous_run``: ``--no-resume`` in a directory that holds a run moves that run's files
  (config, metrics, TensorBoard events, checkpoints) to ``RUN_DIR/previous_runs/<UTC time>/`` and
  says where, instead of truncating its metrics and mixing the new checkpoints with the old ones.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from dinov2.collectives import raise_if_any_rank_failed
from dinov2.distributed import DistributedEnv
from dinov2.train.build import ensure_writable_dir

logger = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "loss_curve.png", "knn_curve.png",
             "monitors.png", "trackers.json")
ARCHIVE_DIR = "previous_runs"


class RunDirectoryBusyError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """Exclusive, non-blocking lock on a run directory (``with RunLock(dir): ...`` or acquire/release)."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirectoryBusyError(
                f"run directory {self.path.parent} is in use by {holder}; wait for that run to end, stop it, "
                f"or choose another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": started}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_output_dir(output_dir: str | Path, env: DistributedEnv) -> Path:
    """Rank 0 creates the directory; every rank checks that it sees it writable (a shared filesystem).
    A failure on any rank raises on all of them instead of leaving the others in a collective."""
    path = Path(output_dir)
    error = None
    if env.is_main:
        try:
            ensure_writable_dir(path)
        except PermissionError as failure:
            error = failure
    raise_if_any_rank_failed(error, f"creating the output directory {path}", env.process_group)
    if not env.is_main and not (path.is_dir() and os.access(path, os.W_OK)):
        error = PermissionError(f"output directory {path} is not visible or not writable on rank {env.rank} "
                                f"(it must be on a filesystem shared by all nodes)")
    raise_if_any_rank_failed(error, f"checking the output directory {path}", env.process_group)
    return path


def archive_previous_run(directory: str | Path) -> Path | None:
    """Move the files of a run found in ``directory`` aside; return where (None if there was none)."""
    directory = Path(directory)
    present = [directory / name for name in RUN_FILES if (directory / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = directory / ARCHIVE_DIR / stamp
    suffix = 1
    while target.exists():
        target = directory / ARCHIVE_DIR / f"{stamp}-{suffix}"
        suffix += 1
    target.mkdir(parents=True)
    for path in present:
        path.rename(target / path.name)  # same filesystem: a rename, nothing copied or lost
    logger.warning("--no-resume: the previous run in %s was moved to %s", directory, target)
    return target
