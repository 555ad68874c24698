"""The DINOv2 trainer: one loop that reads top to bottom.

    Trainer(cfg, output_dir, env=env).fit()      (``run`` joins the process group around it)

The command line is ``dinov2-train`` (``dinov2.cli.train``; ``torchrun -m dinov2.cli.train`` or
``dinov2-submit`` to scale out).

Each step: schedules -> (micro-batches: teacher targets, packed student pass, losses, backward)
-> unscale/clip -> finiteness decided on the device -> AdamW -> EMA teacher. A non-finite step
leaves no trace (optimizer, teacher, loss centers, grad scaler as before it) and is counted. With
fused AdamW and no fp16 grad scaler this takes no host-device synchronisation. Checkpoints hold
every piece of state (model, teacher, optimizer, loss centers, step, data position, RNG), so a
resumed run reproduces the uninterrupted one bitwise on CPU.

What survives what: ``kill -9`` at any moment (checkpoints are atomic; the run resumes from the
newest complete one), SIGTERM / Ctrl-C (the current step ends, a checkpoint is written, exit
128 + signal), a damaged newest checkpoint (the previous one is used, with a warning), a failed
save (disk full: a clear error, older checkpoints intact), a second run in the same directory
(refused: the directory is locked), ``--no-resume`` over an old run (moved to previous_runs/).

Distributed (a ``DistributedEnv`` with a process group, see dinov2/distributed): student and
teacher are FSDP2-sharded, each rank reads its share of every global batch
(``batch_size_per_gpu * world_size * grad_accum_steps`` samples, which the lr scaling uses),
losses all-reduce their centers and Sinkhorn sums, and rank 0 alone writes config, metrics and
checkpoint renames while every rank writes its own checkpoint shards. Without a process group
nothing of this runs and the single-process path is unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dinov2.checkpoint import CheckpointManager, CheckpointReadError, UnsafeCheckpointError, read_metadata
from dinov2.checkpoint.rng import get_rng_state, rank_key, seed_rank, seed_resumed_rank, set_rng_state
from dinov2.collectives import all_reduce_, mean_over_ranks
from dinov2.compute import autocast_dtype, intra_op_threads, resolve_device
from dinov2.configs import save_config
from dinov2.distributed import DistributedEnv, DistributedSetupError, distributed_session
from dinov2.logging import MetricsWriter
from dinov2.train.build import build_dataset, build_train_loader
from dinov2.train.distillation import fit_teacher_heads
from dinov2.train.head_warmup import backbone_frozen, drop_backbone_grads, drop_unsaved_optimizer_state
from dinov2.train.health import CollapseWatch
from dinov2.train.init_from import init_model_from
from dinov2.train.knn_monitor import KnnMonitor
from dinov2.train.model import build_training_model
from dinov2.train.param_groups import apply_schedule_to_groups, build_param_groups
from dinov2.train.phases import PhasedBatches, plan_phases
from dinov2.train.preflight import log_plan_warnings
from dinov2.train.run_dir import RunLock, archive_previous_run, prepare_output_dir
from dinov2.train.run_plan import with_batch_size_per_gpu, with_epoch_length
from dinov2.train.schedules import build_schedules
from dinov2.train.signals import StopOnSignal, TrainingInterrupted

logger = logging.getLogger("dinov2.train")


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg, output_dir: str | Path, *, resume: bool = True, env: DistributedEnv | None = None) -> None:
        if env is None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise DistributedSetupError("a process group exists: pass env=init_distributed(...) to the Trainer")
            env = DistributedEnv.single(resolve_device(cfg.compute.device))
        self.env = env
        self.rank, self.world_size = env.rank, env.world_size
        self.cfg = cfg = with_batch_size_per_gpu(cfg, self.world_size)
        self.output_dir = prepare_output_dir(output_dir, env)
        # Rank 0 holds the run directory for the life of the run (a second run is refused at once).
        self._lock = RunLock(self.output_dir).acquire() if env.is_main else None
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg, resume: bool) -> None:
        env = self.env
        if not resume and env.is_main:
            archive_previous_run(self.output_dir)  # --no-resume never mixes with an old run
        self.device = env.device

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        # Meta-device build, activation checkpointing, compile, FSDP2, init on the device, attention kernel.
        self.model = build_training_model(cfg, env)
        if self.world_size > 1:
            seed_rank(cfg.train.seed, self.rank)  # from here on, stochastic depth differs per rank
        self.accum_steps = cfg.compute.grad_accum_steps
        self.global_batch_size = cfg.train.batch_size_per_gpu * self.world_size * self.accum_steps
        self.dataset = build_dataset(cfg.data.dataset, cfg.student.in_chans)
        self.cfg = cfg = with_epoch_length(cfg, len(self.dataset), self.global_batch_size)  # auto: one pass
        self.schedules = build_schedules(cfg, self.global_batch_size)
        self.total_steps = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
        self.phases = plan_phases(cfg, self.total_steps)  # high_res.*: checked before any training
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        if env.is_main:  # what --dry-run warns about (thousands of passes over a tiny set...), said here too
            log_plan_warnings(cfg, len(self.dataset), self.world_size, self.device)

        groups = build_param_groups(
            self.model.student.named_parameters(), depth=self.model.student.backbone.n_blocks,
            layerwise_decay=cfg.optim.layerwise_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
        )
        self.optimizer = torch.optim.AdamW(
            groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=cfg.compute.fused_optimizer or None
        )
        dtype = autocast_dtype(cfg.compute.precision)
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        if env.is_distributed:  # agrees on inf/NaN across ranks, whose gradient shards differ
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(self.device.type, enabled=cfg.compute.precision == "fp16")
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.compute.precision == "fp16")

        # Fused AdamW skips a step on the device (its found_inf input): no host sync per step. The fp16
        # grad scaler and the foreach optimizer need the decision on the host.
        self.device_side_skip = bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()
        self._host_group = dist.new_group(backend="gloo") if env.is_distributed else None  # stop requests
        self.step = 0
        self.nonfinite_steps = 0
        self._nonfinite_new = torch.zeros((), dtype=torch.int64, device=self.device)  # not yet counted on host
        self.data_position = 0
        self.skipped_files: set[int] = set()  # dataset indices of unreadable files met so far (all ranks)
        self.checkpoints = CheckpointManager(
            self.output_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save,
            process_group=env.process_group,
        )
        if resume:
            self._resume()
        if cfg.train.init_from and self.step == 0:  # a run that has its own checkpoint resumes from it instead
            init_model_from(self.model, cfg.train.init_from, process_group=env.process_group)
        if self.step == 0:  # distillation from a backbone without heads: fit them (checkpointed, so once)
            fit_teacher_heads(self.model, cfg, self.dataset, env)

        self.knn_monitor = KnnMonitor(cfg) if cfg.evaluation.knn_every_n_steps > 0 else None
        self.collapse_watch = CollapseWatch.for_run(  # warnings at logging steps once the lr warmup is over
            cfg, self.model.student.backbone.embed_dim, cfg.optim.warmup_epochs * cfg.train.OFFICIAL_EPOCH_LENGTH,
        ) if cfg.logging.collapse_warnings and env.is_main else None
        # Written only once the resume was accepted: a rejected resume leaves the run's config as it was.
        if env.is_main:
            _write_atomically(self.output_dir / "config.yaml", lambda path: save_config(cfg, path))
        self.metrics = MetricsWriter.for_run(self.output_dir, cfg, enabled=env.is_main, resume_step=self.step)

    def close(self) -> None:
        """Release the run directory (also done at the end of ``fit``)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optim_state,
            "progress": {"step": self.step, "data_position": self.data_position, "nonfinite_steps": self.nonfinite_steps,
                         "skipped_files": sorted(self._all_skipped_files()),
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
        unsaved = drop_unsaved_optimizer_state(state["optimizer"], saved)  # parameters frozen when it was written
        if "progress.skipped_files" not in saved:  # written before the count was checkpointed
            del state["progress"]["skipped_files"]
        self.checkpoints.load(state, path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(strict=not unsaved))  # model keys were checked by checkpoints.load
        self.step = int(state["progress"]["step"])
        self.data_position = int(state["progress"]["data_position"])
        self.nonfinite_steps = int(state["progress"]["nonfinite_steps"])
        self.skipped_files = set(state["progress"].get("skipped_files", ()))
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

    def _resume(self) -> None:
        """Load the newest checkpoint that can be read; damaged newer ones are named and passed over."""
        damaged = []
        for _, path in self.checkpoints.candidates():
            try:
                self.load_checkpoint(path)
            except UnsafeCheckpointError:
                raise  # a crafted file is not damage to work around: stop and say so
            except CheckpointReadError as error:
                logger.warning("%s; trying the previous checkpoint", error)
                damaged.append(str(path))
                continue
            if damaged:
                logger.warning("resumed from %s: the newer checkpoint(s) %s could not be read", path, ", ".join(damaged))
            return
        if damaged:
            raise CheckpointReadError(
                f"no checkpoint in {self.checkpoints.directory} can be read (damaged: {', '.join(damaged)}); "
                f"to start over, run with --no-resume (the old run is moved to previous_runs/)"
            )

    def _state_is_finite(self) -> bool:
        """Every floating tensor of the model (student, teacher, loss centers) is finite, on all ranks."""
        tensors = [t.to_local() if hasattr(t, "to_local") else t for t in self.model.state_dict().values()]
        flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
        finite = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=self.device)
        return bool(self._all_ranks(finite))

    def save_checkpoint(self) -> Path:
        self._sync_nonfinite_count()
        return self.checkpoints.save(self.step, self.state_dict(), finite=self._state_is_finite())

    # ------------------------------------------------------------------ one step
    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        norms = {}
        if self.cfg.optim.clip_grad > 0:
            for name, module in self.model.student.items():  # per module, as the official recipe
                norm = torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.clip_grad)
                # Sharded gradients give a DTensor norm (already global); log it as a plain tensor.
                norms[f"grad_norm_{name}"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return norms

    def _all_ranks(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` (0-dim bool on the device) true on every rank; an all-reduce on the device, no host sync."""
        if self.env.process_group is None:
            return flag
        value = flag.to(torch.int32)
        all_reduce_(value, self.env.process_group, op=dist.ReduceOp.MIN)
        return value.bool()

    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum_steps`` micro-batches. Returns device tensors, among
        them ``skipped`` (1 if a loss or gradient norm was non-finite: nothing of the step was kept)."""
        values = self.schedules.at(self.step)
        apply_schedule_to_groups(self.optimizer.param_groups, values["lr"], values["last_layer_lr"], values["weight_decay"])
        self.optimizer.zero_grad(set_to_none=True)
        centers = self.model.loss_centers()  # updated inside the forward pass: restored if the step is skipped
        centers_before = [center.clone() for center in centers]
        scaler_before = self.scaler.state_dict() if self.scaler.is_enabled() else None
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        logs: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            batch = batch.to(self.device, non_blocking=True)
            with self.autocast:
                loss, micro_logs = self.model(batch, teacher_temp=values["teacher_temp"])
            finite = finite & torch.isfinite(loss).all()
            self.scaler.scale(loss / len(micro_batches)).backward()
            for key, value in micro_logs.items():
                logs[key] = logs.get(key, 0.0) + value / len(micro_batches)
        if backbone_frozen(self.step, self.cfg.train.freeze_backbone_steps):  # head warm-up
            drop_backbone_grads(self.model.student)
        self.scaler.unscale_(self.optimizer)
        norms = self._clip_gradients()
        logs.update(norms)
        if not self.scaler.is_enabled():  # with fp16 the scaler itself handles overflowing gradients
            for norm in norms.values():
                finite = finite & torch.isfinite(norm)
        finite = self._all_ranks(finite)  # a skip must be global: parameters are sharded over ranks

        if self.device_side_skip:
            self.optimizer.found_inf = (~finite).float()  # fused AdamW leaves params, moments, step as they were
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            momentum = torch.where(finite, values["teacher_momentum"], 1.0)
            self.model.update_teacher(momentum)
            for center, before in zip(centers, centers_before):
                center.copy_(torch.where(finite, center, before))
        elif bool(finite):  # one host sync
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.model.update_teacher(values["teacher_momentum"])
        else:
            self.scaler.update()  # ends the scaler's step (unscale_ was called) ...
            if scaler_before is not None:
                self.scaler.load_state_dict(scaler_before)  # ... without changing its scale
            for center, before in zip(centers, centers_before):
                center.copy_(before)
        skipped = (~finite).to(torch.int64)
        self._nonfinite_new += skipped
        logs.update({k: torch.tensor(v) for k, v in values.items()})
        logs["skipped"] = skipped
        return logs

    # ------------------------------------------------------------------ loop
    def _sync_nonfinite_count(self) -> None:
        """Fold the steps skipped since the last look into ``nonfinite_steps`` (a host sync: only at
        logging and checkpoint steps) and stop with a clear message past ``train.max_nonfinite_steps``."""
        new = int(self._nonfinite_new)
        if not new:
            return
        self._nonfinite_new.zero_()
        self.nonfinite_steps += new
        logger.warning("non-finite loss or gradients: %d step(s) skipped up to step %d (%d in total)", new, self.step,
                       self.nonfinite_steps)
        if self.nonfinite_steps >= self.cfg.train.max_nonfinite_steps:
            latest = self.checkpoints.latest_good()
            where = f"the last good checkpoint is {latest[1]}" if latest else "no good checkpoint was written yet"
            raise NonFiniteLossError(
                f"the loss was non-finite (NaN/inf) on {self.nonfinite_steps} steps, the last at or before step "
                f"{self.step} (train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); {where}. Check the "
                f"data for NaN/inf values, or try a lower optim.base_lr, a longer optim.warmup_epochs, or "
                f"compute.precision=bf16/fp32 instead of fp16."
            )

    def _all_skipped_files(self) -> set[int]:
        """Unreadable files met by any rank (each file once): a CPU all-gather when distributed."""
        if self._host_group is None:
            return self.skipped_files
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(self.skipped_files), group=self._host_group)
        return set().union(*gathered)

    def _stop_requested(self, stop: StopOnSignal) -> bool:
        """Whether any rank received a stop signal (a CPU all-reduce when distributed, not a device sync)."""
        if self._host_group is None:
            return stop.requested
        flag = torch.tensor([1 if stop.requested else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host_group)
        return bool(flag.item())

    def _interrupt(self, stop: StopOnSignal) -> None:
        """Write a checkpoint at the step just finished and stop (or let a launcher's handler take over)."""
        latest = self.checkpoints.latest()
        path = latest[1] if latest is not None and latest[0] == self.step else self.save_checkpoint()
        self.checkpoints.wait()
        name = stop.name or "a stop signal on another rank"
        message = f"stopped on {name} after step {self.step}; checkpoint {path}; rerun the same command to resume"
        logger.warning(message)
        handler = stop.chained_handler()
        if handler is not None:  # e.g. submitit's SIGUSR2: requeue the job (it resumes from this checkpoint)
            handler(stop.signum, None)
        raise TrainingInterrupted(stop.signum or 15, message)

    def fit(self) -> dict:
        try:
            with StopOnSignal() as stop:
                return self._fit(stop)
        finally:
            self.close()

    def _fit(self, stop: StopOnSignal) -> dict:
        cfg = self.cfg
        if self.step >= self.total_steps:
            logger.info("nothing to do: step %d >= total %d", self.step, self.total_steps)
            return {"step": self.step}
        # The loader of each step's phase (rebuilt at the high-resolution switch, at the same stream position).
        loader = PhasedBatches(self.phases, cfg, lambda phase_cfg, start: build_train_loader(
            phase_cfg, self.dataset, start=start, rank=self.rank, world_size=self.world_size),
            start=self.data_position, skipped_files=self.skipped_files)  # one set: checkpoints save it
        progress = None
        if cfg.logging.progress_bar and self.env.is_main:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        started, last = time.perf_counter(), {}
        try:
            while self.step < self.total_steps:
                micro_batches = [loader.next(self.step) for _ in range(self.accum_steps)]
                self.data_position = loader.position
                logs = self.train_step(micro_batches)
                self.step += 1
                if self.step % cfg.logging.every_n_steps == 0 or self.step == self.total_steps:
                    self._sync_nonfinite_count()
                    if not bool(logs["skipped"]):  # a skipped step's losses are NaN: nothing to log
                        if self.env.is_distributed:  # metrics describe the global batch
                            last = mean_over_ranks(logs, self.device, self.env.process_group)
                        else:
                            last = {k: float(v) for k, v in logs.items()}
                        del last["skipped"]
                        last.update(nonfinite_steps=self.nonfinite_steps, skipped_files=len(self._all_skipped_files()),
                                    seconds=time.perf_counter() - started, **self.phases.at(self.step - 1).log_values())
                        self.metrics.write(self.step, last)
                        if self.collapse_watch is not None:
                            self.collapse_watch.check(self.step, last)
                        if progress is not None:
                            progress.set_postfix(loss=f"{last['total_loss']:.3f}", lr=f"{last['lr']:.2e}")
                if self.knn_monitor is not None and self.step % cfg.evaluation.knn_every_n_steps == 0:
                    knn = self.knn_monitor(self.model.ema_model.backbone)  # the final model (student EMA if distilling)
                    self.metrics.write(self.step, knn)
                    logger.info("step %d: %s", self.step, knn)
                if progress is not None:
                    progress.update(1)
                if self.step % cfg.checkpoint.every_n_steps == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                if self._stop_requested(stop):
                    self._interrupt(stop)
            self.checkpoints.wait()  # an async save still in flight is published before returning
            self._sync_nonfinite_count()
        finally:
            if progress is not None:
                progress.close()
            self.metrics.close()
            loader.close()
        return {"step": self.step, **last}


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def run(cfg, output_dir: str | Path, *, resume: bool = True) -> tuple[dict, DistributedEnv]:
    """Join the process group ``cfg.distributed`` describes (or none), train, leave the group.
    Returns the last logged metrics and where this process sat in the job."""
    with distributed_session(cfg.distributed, cfg.compute.device) as env, intra_op_threads(cfg.compute.num_threads):
        if not env.is_main:  # one copy of the INFO log, from rank 0
            logging.getLogger("dinov2").setLevel(logging.WARNING)
        return Trainer(cfg, output_dir, resume=resume, env=env).fit(), env
