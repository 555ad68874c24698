"""The DINOv2 trainer: one loop that reads top to bottom.

    dinov2-train --config train/vitl14.yaml --output-dir runs/x key=value ...

Each step: schedules -> (micro-batches: teacher targets, packed student pass, losses, backward)
-> non-finite check -> unscale/clip -> AdamW -> EMA teacher. Checkpoints hold every piece of
state (model, teacher, optimizer, loss centers, step, data position, RNG), so a resumed run
reproduces the uninterrupted one bitwise on CPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dinov2.checkpoint import CheckpointManager
from dinov2.configs import ConfigError, load_config, save_config
from dinov2.logging import MetricsWriter
from dinov2.train.build import batch_to_device, build_dataset, build_train_loader, ensure_writable_dir, resolve_device
from dinov2.train.param_groups import apply_schedule_to_groups, build_param_groups
from dinov2.train.schedules import build_schedules
from dinov2.train.ssl_meta_arch import SSLMetaArch

logger = logging.getLogger("dinov2.train")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg, output_dir: str | Path, *, resume: bool = True) -> None:
        self.cfg = cfg
        self.output_dir = ensure_writable_dir(output_dir)
        self.device = resolve_device(cfg.compute.device)
        save_config(cfg, self.output_dir / "config.yaml")

        torch.manual_seed(cfg.train.seed)
        self.model = SSLMetaArch(cfg).to(self.device).train()
        self.accum_steps = cfg.compute.grad_accum_steps
        self.global_batch_size = cfg.train.batch_size_per_gpu * self.accum_steps  # world size 1
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
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.compute.precision == "fp16")

        self.step = 0
        self.nonfinite_steps = 0
        self.data_position = 0
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
        if resume and (latest := self.checkpoints.latest()) is not None:
            self.load_checkpoint(latest[1])

        self.dataset = build_dataset(cfg.data.dataset, cfg.student.in_chans)
        self.metrics = MetricsWriter(self.output_dir, tensorboard=cfg.logging.tensorboard)
        self.metrics.truncate_after(self.step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "progress": {"step": self.step, "data_position": self.data_position, "nonfinite_steps": self.nonfinite_steps},
            "rng": {"torch": torch.get_rng_state()},
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
        }
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_checkpoint(self, path: Path) -> None:
        state = self.state_dict()
        self.checkpoints.load(state, path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.step = int(state["progress"]["step"])
        self.data_position = int(state["progress"]["data_position"])
        self.nonfinite_steps = int(state["progress"]["nonfinite_steps"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        logger.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, self.state_dict())

    # ------------------------------------------------------------------ one step
    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        norms = {}
        if self.cfg.optim.clip_grad > 0:
            for name, module in self.model.student.items():  # per module, as the official recipe
                norms[f"grad_norm_{name}"] = torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.clip_grad)
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
            if not torch.isfinite(loss):
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
        loader = build_train_loader(cfg, self.dataset, start=self.data_position)
        batches = iter(loader)
        progress = None
        if cfg.logging.progress_bar:
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
                    last = {k: float(v) for k, v in logs.items()}
                    last.update(nonfinite_steps=self.nonfinite_steps, skipped_files=loader.skipped_samples,
                                seconds=time.perf_counter() - started)
                    self.metrics.write(self.step, last)
                    if progress is not None:
                        progress.set_postfix(loss=f"{last['total_loss']:.3f}", lr=f"{last['lr']:.2e}")
                if progress is not None:
                    progress.update(1)
                if self.step % cfg.checkpoint.every_n_steps == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
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


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        result = Trainer(cfg, args.output_dir, resume=not args.no_resume).fit()
    except (ConfigError, NonFiniteLossError, PermissionError, FileNotFoundError, ValueError) as error:
        print(f"dinov2-train: error: {error}", file=sys.stderr)
        return 2
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
