"""Scale-out plumbing: which launcher started us, the process group and device mesh, FSDP2 sharding."""

from .collectives import mean_over_ranks, raise_if_any_rank_failed
from .fsdp import mixed_precision_policy, shard_backbone, shard_ssl_model
from .launch import LaunchError, LaunchInfo, read_launch_info, resolve_launcher, slurm_hostnames
from .setup import (
    DistributedEnv, DistributedSetupError, build_mesh, distributed_session, init_distributed, resolve_backend,
    resolve_device, shutdown,
)

__all__ = [
    "DistributedEnv", "DistributedSetupError", "LaunchError", "LaunchInfo", "build_mesh",
    "distributed_session", "init_distributed", "mean_over_ranks", "mixed_precision_policy", "raise_if_any_rank_failed",
    "read_launch_info", "resolve_backend", "resolve_device", "resolve_launcher", "shard_backbone", "shard_ssl_model",
    "shutdown", "slurm_hostnames",
]
