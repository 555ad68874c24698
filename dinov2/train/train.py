"""The DINOv2 trainer: one loop that reads top to bottom.

    dinov2-train --config train/vitl14.yaml --output-dir runs/x key=value ...
    torchrun --nproc-per-node 8 -m dinov2.train.train --config ... --output-dir ...   (or dinov2-submit)

Each step: schedules -> (micro-batches: teacher targets, packed student pass, losses, backward)
-> non-finite check -> unscale/clip -> AdamW -> EMA teacher. Checkpoints hold every piece of
state (model, teacher, optimizer, loss centers, step, data position, RNG), so a resumed run
reproduces the uninterrupted one bitwise on CPU.

Distributed (a ``DistributedEnv`` with a process group, see dinov2/distributed): student and
teacher are FSDP2-sharded, each rank reads its share of every global batch
(``batch_size_per_gpu * world_size * grad_accum_steps`` samples, which the lr scaling uses),
losses all-reduce their centers and Sinkhorn sums, and rank 0 alone writes config, metrics and
checkpoint renames while every rank writes its own checkpoint shards. Without a process group
nothing of this runs and the single-process path is unchanged.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dinov2.checkpoint import CheckpointManager, read_metadata
from dinov2.checkpoint.rng import get_rng_state, rank_key, seed_rank, seed_resumed_rank, set_rng_state
from dinov2.configs import ConfigError, load_config, save_config
from dinov2.distributed import (
    DistributedEnv, DistributedSetupError, any_rank, distributed_session, mean_over_ranks, raise_if_any_rank_failed,
    shard_ssl_model,
)
from dinov2.logging import MetricsWriter
from dinov2.train.knn_monitor import KnnMonitor
from dinov2.train.build import batch_to_device, build_dataset, build_train_loader, ensure_writable_dir, resolve_device
from dinov2.train.param_groups import apply_schedule_to_groups, build_param_groups
from dinov2.train.schedules import build_schedules
from dinov2.train.ssl_meta_arch import SSLMetaArch

logger = logging.getLogger("dinov2.train")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    pass


def with_batch_size_per_gpu(cfg, world_size: int):
    """``cfg`` with ``train.batch_size_per_gpu`` derived from ``train.global_batch_size`` when that is set."""
    total = cfg.train.global_batch_size
    if total is None:
        return cfg
    per_step = world_size * cfg.compute.grad_accum_steps
    if total % per_step:
        raise ConfigError(
            f"train.global_batch_size={total} is not divisible by world size {world_size} x "
            f"compute.grad_accum_steps={cfg.compute.grad_accum_steps}; pick a multiple of {per_step}"
        )
    cfg = copy.deepcopy(cfg)  # DictConfig.copy() is shallow: the caller's cfg.train would change too
    cfg.train.batch_size_per_gpu = total // per_step
    return cfg


def _prepare_output_dir(output_dir: str | Path, env: DistributedEnv) -> Path:
    """Rank 0 creates the directory; every rank checks that it sees it writable (a shared filesystem).
    A failure on any rank raises on all of them instead of leaving the others in a collective."""
    path = Path(output_dir)
    error = None
    if env.is_main:
        try:
            ensure_writable_dir(path)
        except PermissionError as failure:
            error = failure
    raise_if_any_rank_failed(error, f"creating the output directory {path}")
    if not env.is_main and not (path.is_dir() and os.access(path, os.W_OK)):
        error = PermissionError(f"output directory {path} is not visible or not writable on rank {env.rank} "
                                f"(it must be on a filesystem shared by all nodes)")
    raise_if_any_rank_failed(error, f"checking the output directory {path}")
    return path


class Trainer:
    def __init__(self, cfg, output_dir: str | Path, *, resume: bool = True, env: DistributedEnv | None = None) -> None:
        if env is None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise DistributedSetupError("a process group exists: pass env=init_distributed(...) to the Trainer")
            env = DistributedEnv.single(resolve_device(cfg.compute.device))
        self.env = env
        self.rank, self.world_size = env.rank, env.world_size
        self.cfg = cfg = with_batch_size_per_gpu(cfg, self.world_size)
        self.output_dir = _prepare_output_dir(output_dir, env)
        self.device = env.device
        if cfg.compute.num_threads is not None:
            if cfg.compute.num_threads < 1:
                raise ConfigError(f"compute.num_threads must be >= 1 (or null for torch's default), got {cfg.compute.num_threads}")
            torch.set_num_threads(cfg.compute.num_threads)
        if env.is_main:
            save_config(cfg, self.output_dir / "config.yaml")

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model = SSLMetaArch(cfg).to(self.device).train()
        if env.is_distributed:
            shard_ssl_model(self.model, env.mesh, cfg.distributed)
        if self.world_size > 1:
            seed_rank(cfg.train.seed, self.rank)  # from here on, stochastic depth differs per rank
        self.accum_steps = cfg.compute.grad_accum_steps
        self.global_batch_size = cfg.train.batch_size_per_gpu * self.world_size * self.accum_steps
        self.schedules = build_schedules(cfg, self.global_batch_size)
        self.total_steps = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

        groups = build_param_groups(
            self.model.student.named_parameters(), depth=self.model.student.backbone.n_blocks,
            layerwise_decay=cfg.optim.layerwise_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
        )
        self.optimizer = torch.optim.AdamW(
            groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=cfg.compute.fused_optimizer or None
        )
        dtype = AUTOCAST_DTYPES[cfg.compute.precision]
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        if env.is_distributed:  # agrees on inf/NaN across ranks, whose gradient shards differ
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(self.device.type, enabled=cfg.compute.precision == "fp16")
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.compute.precision == "fp16")

        self.step = 0
        self.nonfinite_steps = 0
        self.data_position = 0
        self.checkpoints = CheckpointManager(
            self.output_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save
        )
        if resume and (latest := self.checkpoints.latest()) is not None:
            self.load_checkpoint(latest[1])

        self.dataset = build_dataset(cfg.data.dataset, cfg.student.in_chans)
        self.knn_monitor = KnnMonitor(cfg) if cfg.evaluation.knn_every_n_steps > 0 else None
        self.metrics = MetricsWriter(self.output_dir, tensorboard=cfg.logging.tensorboard, enabled=env.is_main)
        self.metrics.truncate_after(self.step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optim_state,
            "progress": {"step": self.step, "data_position": self.data_position, "nonfinite_steps": self.nonfinite_steps,
                         "world_size": self.world_size, "global_batch_size": self.global_batch_size},
            # One key per rank: DCP keeps a single copy of a key that every rank saves.
            "rng": {rank_key(self.rank): get_rng_state(self.device)},
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
        }

    def load_checkpoint(self, path: Path) -> None:
        """Resume from ``path``, written on this or any other world size (see dinov2/checkpoint/rng.py
        for the RNG of ranks the checkpoint did not have)."""
        state = self.state_dict()
        saved = read_metadata(path).state_dict_metadata
        own_rng = f"rng.{rank_key(self.rank)}.torch" in saved
        if not own_rng:
            del state["rng"]
        self.checkpoints.load(state, path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.step = int(state["progress"]["step"])
        self.data_position = int(state["progress"]["data_position"])
        self.nonfinite_steps = int(state["progress"]["nonfinite_steps"])
        if own_rng:
            set_rng_state(state["rng"][rank_key(self.rank)], self.device)
        else:
            seed_resumed_rank(self.cfg.train.seed, self.step, self.rank)
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        saved_world, saved_batch = state["progress"]["world_size"], state["progress"]["global_batch_size"]
        if saved_batch != self.global_batch_size:
            logger.warning("checkpoint %s was written with a global batch of %d (world size %d), this run uses %d: "
                           "steps and schedules continue by step, data by sample position", path, saved_batch,
                           saved_world, self.global_batch_size)
        logger.info("resumed from %s at step %d (written on %d ranks, now %d)", path, self.step, saved_world,
                    self.world_size)

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, self.state_dict())

    # ------------------------------------------------------------------ one step
    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        norms = {}
        if self.cfg.optim.clip_grad > 0:
            for name, module in self.model.student.items():  # per module, as the official recipe
                norm = torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.clip_grad)
                # Sharded gradients give a DTensor norm (already global); log it as a plain tensor.
                norms[f"grad_norm_{name}"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return norms

    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor] | None:
        """One optimizer step over ``grad_accum_steps`` micro-batches; None if it was skipped."""
        values = self.schedules.at(self.step)
        apply_schedule_to_groups(self.optimizer.param_groups, values["lr"], values["last_layer_lr"], values["weight_decay"])
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            batch = batch_to_device(batch, self.device)
            with self.autocast:
                loss, micro_logs = self.model(batch, teacher_temp=values["teacher_temp"])
            # Decided together: a rank that skipped alone would leave the others waiting in backward.
            if any_rank(not torch.isfinite(loss), self.device):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            self.scaler.scale(loss / len(micro_batches)).backward()
            for key, value in micro_logs.items():
                logs[key] = logs.get(key, 0.0) + value / len(micro_batches)
        self.scaler.unscale_(self.optimizer)
        logs.update(self._clip_gradients())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.update_teacher(values["teacher_momentum"])
        logs.update({k: torch.tensor(v) for k, v in values.items()})
        return logs

    # ------------------------------------------------------------------ loop
    def _stop_for_nonfinite(self) -> None:
        latest = self.checkpoints.latest()
        where = f"the last good checkpoint is {latest[1]}" if latest else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"the loss was non-finite (NaN/inf) on {self.nonfinite_steps} steps, the last at step {self.step} "
            f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); {where}. Try a lower optim.base_lr, "
            f"a longer optim.warmup_epochs, or compute.precision=bf16/fp32 instead of fp16."
        )

    def fit(self) -> dict:
        cfg = self.cfg
        if self.step >= self.total_steps:
            logger.info("nothing to do: step %d >= total %d", self.step, self.total_steps)
            return {"step": self.step}
        loader = build_train_loader(cfg, self.dataset, start=self.data_position, rank=self.rank,
                                    world_size=self.world_size)
        batches = iter(loader)
        progress = None
        if cfg.logging.progress_bar and self.env.is_main:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        started, last = time.perf_counter(), {}
        try:
            while self.step < self.total_steps:
                micro_batches = [next(batches) for _ in range(self.accum_steps)]
                self.data_position = loader.position
                logs = self.train_step(micro_batches)
                if logs is None:
                    self.nonfinite_steps += 1
                    logger.warning("non-finite loss at step %d: step skipped (%d so far)", self.step, self.nonfinite_steps)
                    if self.nonfinite_steps >= cfg.train.max_nonfinite_steps:
                        self._stop_for_nonfinite()
                self.step += 1
                if logs is not None and (self.step % cfg.logging.every_n_steps == 0 or self.step == self.total_steps):
                    if self.env.is_distributed:  # metrics describe the global batch
                        last = mean_over_ranks(logs, self.device)
                    else:
                        last = {k: float(v) for k, v in logs.items()}
                    last.update(nonfinite_steps=self.nonfinite_steps, skipped_files=loader.skipped_samples,
                                seconds=time.perf_counter() - started)
                    self.metrics.write(self.step, last)
                    if progress is not None:
                        progress.set_postfix(loss=f"{last['total_loss']:.3f}", lr=f"{last['lr']:.2e}")
                if self.knn_monitor is not None and self.step % cfg.evaluation.knn_every_n_steps == 0:
                    knn = self.knn_monitor(self.model.teacher.backbone)
                    self.metrics.write(self.step, knn)
                    logger.info("step %d: %s", self.step, knn)
                if progress is not None:
                    progress.update(1)
                if self.step % cfg.checkpoint.every_n_steps == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
            self.checkpoints.wait()  # an async save still in flight is published before returning
        finally:
            if progress is not None:
                progress.close()
            self.metrics.close()
            del batches
        return {"step": self.step, **last}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dinov2-train", description="DINOv2 self-supervised pretraining on one machine (see dinov2-submit to scale out).",
        epilog="Example: dinov2-train --config train/demo_mnist.yaml --output-dir runs/demo optim.epochs=5",
    )
    parser.add_argument("--config", default=None, help="recipe YAML (a path, or relative to the packaged configs/)")
    parser.add_argument("--output-dir", required=True, help="where config, metrics, checkpoints go")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the output directory")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. optim.base_lr=1e-3)")
    return parser.parse_args(argv)


def run(cfg, output_dir: str | Path, *, resume: bool = True) -> tuple[dict, DistributedEnv]:
    """Join the process group ``cfg.distributed`` describes (or none), train, leave the group.
    Returns the last logged metrics and where this process sat in the job."""
    with distributed_session(cfg.distributed, cfg.compute.device) as env:
        if not env.is_main:  # one copy of the INFO log, from rank 0
            logging.getLogger("dinov2").setLevel(logging.WARNING)
        return Trainer(cfg, output_dir, resume=resume, env=env).fit(), env


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        result, env = run(cfg, args.output_dir, resume=not args.no_resume)
    except (ConfigError, NonFiniteLossError, PermissionError, FileNotFoundError, ValueError,
            DistributedSetupError) as error:  # CheckpointMismatchError is a ValueError
        print(f"dinov2-train: error: {error}", file=sys.stderr)
        return 2
    if env.is_main:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
