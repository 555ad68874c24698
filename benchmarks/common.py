"""Shared plumbing for benchmark scripts: timing, hardware description, JSON + markdown output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def hardware() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # Other processes' load at the start: CPU timings on a shared machine are only as good as this.
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, rows: Sequence[dict], columns: Sequence[str], meta: dict,
                  directory: Path = RESULTS_DIR) -> Path:
    """Write ``<directory>/<name>.json`` and ``<name>.md`` (default: results/); return the markdown path."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "hardware": hardware(), **meta, "rows": list(rows)}
    (directory / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    hw = payload["hardware"]
    where = hw.get("gpu") or (f"{hw['cpu']} ({hw['cpu_count']} cores, {hw['torch_threads']} torch threads, "
                              f"load average {hw.get('load_avg_1min')})")
    text = f"### {title}\n\n{where}, torch {hw['torch']}, {hw['date']}.\n\n{markdown_table(rows, columns)}\n"
    path = directory / f"{name}.md"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ streaming results
class JsonLines:
    """Each result printed as one JSON line (and appended to ``path``) the moment it exists, so a run
    cut short by a time limit still returns everything measured before."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.records: list[dict] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def emit(self, kind: str, **fields) -> dict:
        record = {"kind": kind, **fields}
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(line + "\n")
        self.records.append(record)
        return record


# ------------------------------------------------------------------ the real train step
def write_random_images(path: Path, n: int, size: int, channels: int = 3) -> str:
    """``n`` random uint8 images ``[C, size, size]`` in one .npy; returns the ``data.dataset`` spec."""
    images = np.random.default_rng(0).integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    np.save(path, images)
    return f"npy:{path}"


def build_trainer(config: str | None, overrides: Sequence[str], output_dir: Path, device: str):
    """A real ``Trainer`` on random images, with nothing written per step (no fit loop is run)."""
    from dinov2.configs import load_config
    from dinov2.train.train import Trainer

    dataset = write_random_images(output_dir / "images.npy", 64, 256, _channels(config, overrides))
    quiet = ["logging.tensorboard=false", "logging.progress_bar=false", "evaluation.knn_every_n_steps=0",
             f"compute.device={device}", f"data.dataset={dataset}"]
    cfg = load_config(config, [*quiet, *overrides])
    return Trainer(cfg, output_dir / "run", resume=False)


def _channels(config, overrides) -> int:
    from dinov2.configs import load_config

    return int(load_config(config, list(overrides)).student.in_chans)


def prefetch_batches(trainer, count: int) -> list:
    """``count`` batches from the trainer's own loader, kept on the host (train_step moves them)."""
    from dinov2.train.build import build_train_loader

    loader = iter(build_train_loader(trainer.cfg, trainer.dataset, start=0))
    return [next(loader) for _ in range(count)]


def time_train_steps(trainer, batches: list, steps: int, warmup: int = 2) -> dict:
    """Median ms of ``Trainer.train_step`` over ``steps`` calls after ``warmup`` (batches cycled)."""
    device = trainer.device
    samples = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        micro = [batches[(i * trainer.accum_steps + j) % len(batches)] for j in range(trainer.accum_steps)]
        synchronize(device)
        start = time.perf_counter()
        trainer.train_step(micro)
        synchronize(device)
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
        trainer.step += 1
    ms = statistics.median(samples)
    images = trainer.cfg.train.batch_size_per_gpu * trainer.accum_steps
    result = {"ms_per_step": ms, "images_per_s": 1e3 * images / ms, "steps": steps,
              "ms_samples": [round(s, 2) for s in samples]}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def plain_backbone_ms(trainer, batches: list, steps: int, *, compile: bool = False, warmup: int = 2) -> dict:
    """Lower bound: a fresh backbone of the same architecture, no stochastic depth, no heads, no teacher,
    forward + backward over the same crops, one pass per crop size (as a non-packing trainer runs it)."""
    from dinov2.distributed.parallelize import compile_blocks
    from dinov2.train.ssl_meta_arch import build_backbone

    cfg, device = trainer.cfg, trainer.device
    backbone = build_backbone(cfg.student, cfg.crops.global_crops_size, with_drop_path=False).to(device).train()
    backbone.set_attention_backend(trainer.model.student.backbone.attention_backend)
    if compile:
        compile_blocks(backbone)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[str(cfg.compute.precision)]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    crops = [(b.global_crops.to(device), b.local_crops.to(device)) for b in batches[:2]]
    samples = []
    for i in range(warmup + steps):
        global_crops, local_crops = crops[i % len(crops)]
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            outs = [backbone.forward_features(global_crops.float()), backbone.forward_features(local_crops.float())]
            loss = sum(o["x_norm_clstoken"].float().mean() + o["x_norm_patchtokens"].float().mean() for o in outs)
        loss.backward()
        backbone.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    return {"ms_fwd_bwd": statistics.median(samples), "compiled": compile}
