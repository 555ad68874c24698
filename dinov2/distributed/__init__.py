"""Scale-out plumbing: which launcher started us, the process group and device mesh, FSDP2 sharding."""

from .fsdp import mixed_precision_policy, shard_backbone, shard_ssl_model
from .launch import LaunchError, LaunchInfo, read_launch_info, resolve_launcher, slurm_hostnames
from .setup import (
    DistributedEnv, DistributedSetupError, build_mesh, distributed_session, init_distributed, resolve_backend,
    resolve_device, shutdown,
)

__all__ = [
    "DistributedEnv", "DistributedSetupError", "LaunchError", "LaunchInfo", "build_mesh",
    "distributed_session", "init_distributed", "mixed_precision_policy",
    "read_launch_info", "resolve_backend", "resolve_device", "resolve_launcher", "shard_backbone", "shard_ssl_model",
    "shutdown", "slurm_hostnames",
]
