"""Process group, device and device mesh for one training process.

``init_distributed(cfg.distributed, cfg.compute.device)`` reads the launch (see launch.py), picks
the device (the local rank's GPU, or the CPU), joins the process group with the backend and the
collective timeout from the config, and builds the FSDP device mesh: 1-D ``(shard,)`` over all
ranks, or 2-D ``(replicate, shard)`` for HSDP. It returns a :class:`DistributedEnv` that the
trainer is handed explicitly; nothing here is stored in module state.
"""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dinov2.compute import resolve_device

from .launch import LaunchError, LaunchInfo, read_launch_info

logger = logging.getLogger(__name__)


class DistributedSetupError(RuntimeError):
    """The process group could not be formed (unreachable master, bad world size, wrong backend)."""


@dataclass
class DistributedEnv:
    """Where this process sits in the job. ``mesh is None`` means one process without a process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None = None
    launcher: str = "single"

    @property
    def is_distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The group of all ranks of the job (None for one process): what the trainer hands to the
        checkpoint manager and the collectives."""
        return dist.group.WORLD if self.mesh is not None else None

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "DistributedEnv":
        return cls(rank=0, world_size=1, local_rank=0, device=torch.device(device))


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        name = "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise DistributedSetupError("distributed.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    if name == "nccl":
        # A CPU backend beside NCCL: DCP's async save and CPU-side agreement checks run on it.
        return "cpu:gloo,cuda:nccl"
    return name


def build_mesh(device_type: str, world_size: int, replicate_degree: int = 1) -> DeviceMesh:
    """1-D ``(shard,)`` mesh, or 2-D ``(replicate, shard)`` for HSDP (shard within a group of
    ``world_size / replicate_degree`` ranks, typically a node, replicate across groups)."""
    if replicate_degree < 1 or world_size % replicate_degree:
        raise DistributedSetupError(
            f"distributed.replicate_degree={replicate_degree} does not divide the world size {world_size}"
        )
    if replicate_degree == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        device_type, (replicate_degree, world_size // replicate_degree), mesh_dim_names=("replicate", "shard")
    )


def _check_master_resolves(info: LaunchInfo) -> None:
    # A typo in MASTER_ADDR would otherwise surface as a rendezvous timeout many minutes later.
    try:
        socket.getaddrinfo(info.master_addr, info.master_port)
    except (socket.gaierror, UnicodeError) as error:
        raise DistributedSetupError(
            f"rank {info.rank}: the master address {info.master_addr!r} ({info.launcher}) does not resolve: "
            f"{error}; check MASTER_ADDR / the SLURM node list"
        ) from None


def init_distributed(dist_cfg, compute_device: str = "auto") -> DistributedEnv:
    """Join the process group described by the environment (or stay single); see the module doc."""
    try:
        info = read_launch_info(dist_cfg.launcher, master_port=dist_cfg.master_port)
    except LaunchError as error:
        raise DistributedSetupError(str(error)) from None
    if not info.is_distributed:
        return DistributedEnv.single(resolve_device(compute_device))
    if dist.is_initialized():
        raise DistributedSetupError("a default process group already exists; init_distributed creates it")
    device = resolve_device(compute_device, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = resolve_backend(dist_cfg.backend, device)
    timeout = timedelta(minutes=float(dist_cfg.timeout_minutes))
    _check_master_resolves(info)
    # torchrun: env:// reuses the elastic agent's store; slurm: rank 0 hosts a TCP store.
    init_method = "env://" if info.launcher == "torchrun" else f"tcp://{info.master_addr}:{info.master_port}"
    logger.info("rank %d/%d (local %d, %s): joining %s at %s:%s with %s, timeout %s", info.rank, info.world_size,
                info.local_rank, info.launcher, device, info.master_addr, info.master_port, backend, timeout)
    try:
        dist.init_process_group(backend, init_method=init_method, rank=info.rank, world_size=info.world_size,
                                timeout=timeout)
    except (RuntimeError, OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:500]
        raise DistributedSetupError(
            f"rank {info.rank}/{info.world_size} could not join the process group at "
            f"{info.master_addr}:{info.master_port} ({info.launcher}, {backend}) within "
            f"{dist_cfg.timeout_minutes} min: {first_line}. Check that the master address is reachable from "
            f"this node, the port is open and not in use, and that all {info.world_size} ranks were started."
        ) from error
    try:
        mesh = build_mesh(device.type, info.world_size, dist_cfg.replicate_degree)
    except Exception:
        dist.destroy_process_group()
        raise
    return DistributedEnv(info.rank, info.world_size, info.local_rank, device, mesh, info.launcher)


def shutdown(env: DistributedEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(dist_cfg, compute_device: str = "auto") -> Iterator[DistributedEnv]:
    """``with distributed_session(cfg.distributed, cfg.compute.device) as env: Trainer(..., env=env)``."""
    env = init_distributed(dist_cfg, compute_device)
    try:
        yield env
    finally:
        shutdown(env)
