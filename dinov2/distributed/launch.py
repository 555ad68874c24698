"""Which launcher started this process, and what rank it is, read from the environment only.

Three ways to start the same training:

* ``single``: one process, no process group;
* ``torchrun``: torchrun (or submitit's ``TorchDistributedEnvironment().export()``) sets RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
* ``slurm``: ``srun`` starts one task per GPU and sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
  and SLURM_JOB_NODELIST; the master is the first host of the allocation.

``auto`` looks only at which of these variables are set (torchrun's first, then SLURM's with
more than one task) and says which it found; it never guesses from hostnames or devices.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

from dinov2.configs.choices import Launcher

logger = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS")
LAUNCHERS = Launcher.values()  # defined once, in the config schema's enums


class LaunchError(RuntimeError):
    """The environment does not describe the launch the config asks for."""


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # torchrun | slurm | single
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_distributed(self) -> bool:
        return self.launcher != "single"


def resolve_launcher(launcher: str, environ: Mapping[str, str] | None = None) -> str:
    """``auto`` -> the launcher whose variables are set (logged); any other value is returned as is."""
    environ = os.environ if environ is None else environ
    if launcher not in LAUNCHERS:
        raise LaunchError(f"distributed.launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if launcher != "auto":
        return launcher
    if all(name in environ for name in TORCHRUN_VARS):
        logger.info("distributed.launcher=auto: %s are set -> torchrun", "/".join(TORCHRUN_VARS))
        return "torchrun"
    if all(name in environ for name in SLURM_VARS) and _int(environ, "SLURM_NTASKS") > 1:
        logger.info("distributed.launcher=auto: SLURM_PROCID/SLURM_NTASKS=%s are set -> slurm", environ["SLURM_NTASKS"])
        return "slurm"
    logger.info("distributed.launcher=auto: neither %s nor SLURM_PROCID/SLURM_NTASKS>1 are set -> single process",
                "/".join(TORCHRUN_VARS))
    return "single"


def read_launch_info(launcher: str, environ: Mapping[str, str] | None = None,
                     master_port: int | None = None) -> LaunchInfo:
    """Rank, world size and rendezvous address for ``launcher`` (``auto`` is resolved first)."""
    environ = os.environ if environ is None else environ
    launcher = resolve_launcher(launcher, environ)
    if launcher == "single":
        return LaunchInfo("single")
    if launcher == "torchrun":
        _require(environ, TORCHRUN_VARS, "torchrun", "start with `torchrun --nproc-per-node N -m dinov2.cli.train ...`")
        info = LaunchInfo(
            "torchrun", rank=_int(environ, "RANK"), world_size=_int(environ, "WORLD_SIZE"),
            local_rank=_int(environ, "LOCAL_RANK", 0), master_addr=environ["MASTER_ADDR"],
            master_port=_int(environ, "MASTER_PORT"),
        )
    else:
        _require(environ, SLURM_VARS + ("SLURM_JOB_NODELIST",), "slurm",
                 "run inside an allocation with `srun` (one task per GPU), or use dinov2-submit")
        info = LaunchInfo(
            "slurm", rank=_int(environ, "SLURM_PROCID"), world_size=_int(environ, "SLURM_NTASKS"),
            local_rank=_int(environ, "SLURM_LOCALID", 0),
            master_addr=environ.get("MASTER_ADDR") or slurm_hostnames(environ["SLURM_JOB_NODELIST"])[0],
            master_port=_slurm_master_port(environ, master_port),
        )
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{launcher}: rank {info.rank} is not in [0, world size {info.world_size})")
    return info


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[01-03],gpu7``) with ``scontrol show hostnames``, or, where
    scontrol is not on PATH (e.g. inside a container), with submitit's parser of the same format."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
        hosts = out.stdout.split()
    else:
        from submitit.slurm.slurm import _parse_node_list  # the parser behind SlurmJobEnvironment.hostnames

        hosts = list(_parse_node_list(nodelist))
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts


def _slurm_master_port(environ: Mapping[str, str], configured: int | None) -> int:
    if "MASTER_PORT" in environ:
        return _int(environ, "MASTER_PORT")
    if configured is not None:
        return int(configured)
    if "SLURM_JOB_ID" not in environ:
        raise LaunchError("slurm: set MASTER_PORT or distributed.master_port (SLURM_JOB_ID is not set either)")
    # Same on every task of the job, different between jobs sharing a node.
    return 20000 + int(environ["SLURM_JOB_ID"]) % 40000


def _require(environ: Mapping[str, str], names, launcher: str, hint: str) -> None:
    missing = [name for name in names if name not in environ]
    if missing:
        raise LaunchError(f"distributed.launcher={launcher} but {', '.join(missing)} not set; {hint}")


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in environ and default is not None:
        return default
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={environ[name]!r} is not an integer") from None
