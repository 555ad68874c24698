"""Launcher detection, process-group setup and its failure modes: each gives a clear error, fast,
instead of a hang."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from dinov2.configs import ConfigError, load_config
from dinov2.distributed import (
    DistributedSetupError, LaunchError, build_mesh, init_distributed, read_launch_info, resolve_backend,
    resolve_launcher,
)
from dinov2.train.run_plan import with_batch_size_per_gpu
from dinov2.train.train import Trainer
from gloo_ranks import free_port, run_ranks

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[007-008],cpu1",
         "SLURM_JOB_ID": "123456"}


def test_auto_reads_only_which_variables_are_set():
    assert resolve_launcher("auto", TORCHRUN) == "torchrun"
    assert resolve_launcher("auto", {**SLURM, **TORCHRUN}) == "torchrun"  # torchrun inside an allocation
    assert resolve_launcher("auto", SLURM) == "slurm"
    assert resolve_launcher("auto", {**SLURM, "SLURM_NTASKS": "1"}) == "single"  # a one-task batch script
    assert resolve_launcher("auto", {}) == "single"
    assert resolve_launcher("single", TORCHRUN) == "single"  # explicit wins


def test_launch_info_from_torchrun_and_slurm(monkeypatch):
    info = read_launch_info("torchrun", TORCHRUN)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (1, 4, 1, "10.0.0.1", 29500)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: submitit's parser of the node list
    info = read_launch_info("slurm", SLURM)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr) == (5, 16, 5, "gpu007")
    assert info.master_port == 20000 + 123456 % 40000
    assert read_launch_info("slurm", SLURM, master_port=31000).master_port == 31000
    assert read_launch_info("slurm", {**SLURM, "MASTER_PORT": "32000"}, master_port=31000).master_port == 32000
    with pytest.raises(LaunchError, match="RANK, MASTER_ADDR not set"):
        read_launch_info("torchrun", {"WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(LaunchError, match=r"rank 4 is not in \[0, world size 4\)"):
        read_launch_info("torchrun", {**TORCHRUN, "RANK": "4"})


def test_backend_and_world_size_checks():
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    with pytest.raises(DistributedSetupError, match="nccl needs CUDA"):
        resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(DistributedSetupError, match="replicate_degree=3 does not divide the world size 8"):
        build_mesh("cpu", 8, 3)
    cfg = load_config(None, ["train.global_batch_size=96", "compute.grad_accum_steps=2"])
    assert with_batch_size_per_gpu(cfg, 8).train.batch_size_per_gpu == 6
    assert cfg.train.batch_size_per_gpu == 64  # the caller's config is not changed
    with pytest.raises(ConfigError, match="global_batch_size=96 is not divisible by world size 5"):
        with_batch_size_per_gpu(cfg, 5)


def _torchrun_env(monkeypatch, **values):
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", **values}.items():
        monkeypatch.setenv(key, str(value))


def test_a_master_address_that_does_not_resolve_fails_at_once(monkeypatch):
    _torchrun_env(monkeypatch, MASTER_ADDR="no-such-host.invalid", MASTER_PORT=free_port())
    cfg = load_config(None, ["distributed.launcher=torchrun", "compute.device=cpu"])
    with pytest.raises(DistributedSetupError, match="'no-such-host.invalid' .* does not resolve"):
        init_distributed(cfg.distributed, "cpu")
    assert not dist.is_initialized()


def test_an_unreachable_master_fails_after_the_configured_timeout(monkeypatch):
    # Rank 1 of 2 with nobody listening at the master's port.
    _torchrun_env(monkeypatch, MASTER_PORT=free_port())
    cfg = load_config(None, ["distributed.launcher=torchrun", "distributed.timeout_minutes=0.02"])
    start = time.monotonic()
    with pytest.raises(DistributedSetupError, match=r"rank 1/2 could not join .*127\.0\.0\.1:\d+ .* within 0\.02 min"):
        init_distributed(cfg.distributed, "cpu")
    assert time.monotonic() - start < 60
    assert not dist.is_initialized()


def _stuck_rank(timeout_minutes, done):
    cfg = load_config(None, ["distributed.launcher=torchrun", f"distributed.timeout_minutes={timeout_minutes}"])
    env = init_distributed(cfg.distributed, "cpu")
    if env.rank == 1:  # alive but never joins the collective, until rank 0 has given up
        deadline = time.monotonic() + 40
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
        return "slept"
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        return {"error": None}
    except RuntimeError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    finally:
        open(done, "w").close()


def test_a_stuck_rank_fails_the_others_after_the_collective_timeout(tmp_path):
    rank0, rank1 = run_ranks(_stuck_rank, 2, tmp_path, 0.05, str(tmp_path / "done"), timeout=60)
    assert rank0["error"] is not None and "timed out" in rank0["error"].lower(), rank0
    assert rank0["seconds"] < 15  # 3 s configured, not the 30 min default
    assert rank1 == "slept"


def _train_into(overrides, output_dir):
    Trainer(load_config(None, overrides), output_dir, env=init_distributed(
        load_config(None, overrides).distributed, "cpu"))


def test_an_unwritable_output_directory_fails_on_every_rank(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(AssertionError) as failure:  # both ranks raise; none waits in a collective
        run_ranks(_train_into, 2, tmp_path / "ranks", ["distributed.launcher=torchrun", "compute.device=cpu"],
                  str(blocker / "run"), timeout=120)
    message = str(failure.value)
    assert "ranks failed: [0, 1]" in message and "not writable" in message
    assert "ranks hung: []" in message
