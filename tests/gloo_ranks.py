"""Helpers for tests that run real multi-process gloo jobs on CPU (imported by test_distributed_*,
test_checkpoint_*, test_launch_*).

``run_ranks(fn, world_size, ...)`` forks one process per rank with torchrun's environment
variables (so the code under test takes its ordinary ``launcher=torchrun`` path), waits with a
deadline, kills every rank if one hangs, and raises with each failed rank's traceback.
Fork reuses the already imported torch (spawn re-imports it: ~10 s per process on a loaded
2-core machine); ranks run single-threaded, which keeps fork safe.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from tiny import TINY

START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"

# TINY on a small random uint8 dataset (no MNIST load per process), deterministic losses
# across world sizes: no stochastic depth (its draws are per rank) and no KoLeo (computed
# per rank, as in the official recipe, so it depends on how the batch is split).
DIST_TINY = TINY + [
    "student.drop_path_rate=0.0", "dino.koleo_loss_weight=0", "compute.device=cpu", "distributed.launcher=torchrun",
    "distributed.timeout_minutes=3",
]


def write_dataset(path: Path, n: int = 40) -> str:
    images = np.random.RandomState(0).randint(0, 256, (n, 1, 28, 28)).astype(np.uint8)
    np.save(path, images)
    return f"data.dataset=npy:{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, out_dir, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)  # skip atexit handlers inherited from the pytest process


def _single_threaded(target, args):
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork: never use it here
    target(*args)


def fork_process(target, *args) -> multiprocessing.Process:
    """Start ``target(*args)`` in a forked, single-threaded child process."""
    process = multiprocessing.get_context(START_METHOD).Process(target=_single_threaded, args=(target, args))
    process.start()
    return process


def run_ranks(fn, world_size: int, out_dir: Path, *args, timeout: float = 240.0) -> list:
    """Run ``fn(*args)`` on ``world_size`` forked ranks; return each rank's (torch.save-able) result."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context(START_METHOD)
    port = free_port()
    processes = [context.Process(target=_entry, args=(fn, rank, world_size, port, str(out_dir), args))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    errors = {rank: (out_dir / f"rank{rank}.err").read_text() for rank in range(world_size)
              if (out_dir / f"rank{rank}.err").exists()}
    if hung or errors:
        detail = "\n".join(f"--- rank {rank}:\n{text}" for rank, text in errors.items())
        raise AssertionError(f"ranks hung: {hung}; ranks failed: {sorted(errors)}\n{detail}")
    failed = [rank for rank, process in enumerate(processes) if process.exitcode != 0]
    if failed:
        raise AssertionError(f"ranks {failed} exited with codes {[processes[r].exitcode for r in failed]}")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
