"""Train-step throughput on CPU: 1 process vs 2 gloo processes (FSDP2) on the same global batch.

Every configuration runs the real Trainer (student + EMA teacher, DINO + iBOT + KoLeo, clip,
AdamW) in fresh forked processes, on batches collated once by each rank's own loader (data
loading is not timed). Configurations: 1 process x 1 thread, 2 processes x 1 thread (the
like-for-like pair), 1 process with all threads. Reports median step time, images/s and the
speed-up over 1 x 1. On one CPU machine the processes share its cores, so this measures FSDP2's
overhead (all-gathers, reduce-scatters, loss all-reduces over gloo) against data-parallel use of
the cores, not multi-node scaling.

    python -m benchmarks.bench_distributed [--quick] [--batch 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_results

# spawn, not fork: a forked child cannot use more than one OpenMP thread safely once the parent has
# touched the pool (measured here: 20x slower or hung), and import time is not timed anyway.
START_METHOD = "spawn"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="global batch (images per step)")
    parser.add_argument("--embed-dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--global-size", type=int, default=64)
    parser.add_argument("--local-size", type=int, default=32)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in total per run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--name", default="distributed")
    return parser.parse_args(argv)


def _overrides(args, data: str, world_size: int) -> list[str]:
    return [
        "student.arch=vit_small", f"student.embed_dim={args.embed_dim}", f"student.depth={args.depth}",
        f"student.num_heads={args.heads}", "student.patch_size=16", "student.drop_path_rate=0.1",
        f"crops.global_crops_size={args.global_size}", f"crops.local_crops_size={args.local_size}",
        f"crops.local_crops_number={args.local_crops}", f"dino.head_n_prototypes={args.prototypes}",
        f"ibot.head_n_prototypes={args.prototypes}", "dino.head_hidden_dim=512", "ibot.head_hidden_dim=512",
        f"train.global_batch_size={args.batch}", "data.num_workers=0", f"data.dataset=npy:{data}",
        "compute.device=cpu", "compute.fused_optimizer=false", "logging.tensorboard=false",
        "logging.progress_bar=false", "optim.warmup_epochs=0", "checkpoint.every_n_steps=1000000",
        f"distributed.launcher={'torchrun' if world_size > 1 else 'single'}",
    ]


def _rank(rank, world_size, port, threads, overrides, out_dir, steps, warmup, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from dinov2.configs import load_config
    from dinov2.distributed import distributed_session
    from dinov2.train.build import build_train_loader
    from dinov2.train.train import Trainer

    try:
        cfg = load_config(None, overrides)
        with distributed_session(cfg.distributed, "cpu") as env:
            trainer = Trainer(cfg, out_dir, resume=False, env=env)
            loader = build_train_loader(trainer.cfg, trainer.dataset, start=0, rank=env.rank, world_size=env.world_size)
            batch = next(iter(loader))
            times = []
            for i in range(warmup + steps):
                if env.is_distributed:
                    torch.distributed.barrier()
                start = time.perf_counter()
                trainer.train_step([batch])
                if env.is_distributed:
                    torch.distributed.barrier()  # the step ends when the slowest rank is done
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            queue.put((rank, times))
    except BaseException as error:  # noqa: BLE001 - report to the parent, which raises
        queue.put((rank, f"{type(error).__name__}: {error}"))


def measure(args, data: str, world_size: int, threads: int, out_dir: str) -> list[float]:
    context = multiprocessing.get_context(START_METHOD)
    queue = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [context.Process(target=_rank, args=(r, world_size, port, threads, _overrides(args, data, world_size),
                                                     out_dir, args.steps, args.warmup, queue))
                 for r in range(world_size)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=1800) for _ in processes)
    for process in processes:
        process.join()
    failed = {r: v for r, v in results.items() if isinstance(v, str)}
    if failed:
        raise RuntimeError(f"world size {world_size}: {failed}")
    return results[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.batch, args.embed_dim, args.depth, args.heads, args.prototypes = 4, 64, 2, 2, 256
        args.global_size, args.local_size, args.local_crops, args.steps, args.warmup = 32, 16, 2, 2, 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "images.npy")
        np.save(data, np.random.RandomState(0).randint(0, 256, (max(64, 4 * args.batch), 3, args.global_size,
                                                                   args.global_size)).astype(np.uint8))
        # (processes, threads per process): one thread per process is the like-for-like comparison
        # (OpenMP threads suffer most when other jobs share the cores); then all threads in one process.
        configs = [(1, 1), (2, 1)] + ([(1, args.threads)] if args.threads > 1 else [])
        if args.threads >= 4:
            configs.append((2, args.threads // 2))
        for world_size, threads in configs:
            times = measure(args, data, world_size, threads, str(Path(tmp) / f"run{world_size}_{threads}"))
            step = statistics.median(times)
            rows.append({"processes": world_size, "threads_per_process": threads,
                         "batch_per_process": args.batch // world_size, "step_ms": step * 1e3,
                         "images_per_s": args.batch / step})
            print(rows[-1], flush=True)
    for row in rows:
        row["speedup_vs_1x1"] = rows[0]["step_ms"] / row["step_ms"]
    model = f"ViT d{args.embed_dim} x{args.depth} h{args.heads} p16"
    meta = {"model": model, "global_batch": args.batch, "crops": f"2x{args.global_size} + {args.local_crops}x"
            f"{args.local_size}", "prototypes": args.prototypes, "steps": args.steps, "warmup": args.warmup,
            "backend": "gloo", "load_average_at_start": round(load, 2),
            "note": "processes share this machine's cores: on CPU this measures FSDP2's overhead and data-parallel "
                    "use of the cores, not multi-node scaling; other jobs on a shared machine add noise"}
    title = (f"Train step (student + teacher + losses + AdamW + EMA), {model}, global batch {args.batch}, "
             f"2x{args.global_size} + {args.local_crops}x{args.local_size} crops, FSDP2 over gloo, fp32 "
             f"(load average {load:.1f} at start)")
    path = write_results(args.name, title, rows, ["processes", "threads_per_process", "batch_per_process", "step_ms",
                                                  "images_per_s", "speedup_vs_1x1"], meta)
    print(path.read_text())


if __name__ == "__main__":
    main()
