"""The real ``Trainer.train_step`` on a recipe, against a plain backbone doing the same token work.

The trainer is built exactly as ``dinov2-train`` builds it (meta-device init, activation
checkpointing, compile, attention kernel: whatever the config says), on random images; the timed
call is ``Trainer.train_step`` itself (teacher, packed student, heads, losses, backward, clipping,
AdamW, EMA), with batches prefetched from the trainer's own loader (the input pipeline is measured
by its own benchmark). Lower bound, in the same process: a fresh backbone of the same architecture,
forward + backward over the same crops, no heads, no teacher, no stochastic depth.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import build_trainer, plain_backbone_ms, prefetch_batches, time_train_steps, write_results

QUICK = ["crops.global_crops_size=56", "crops.local_crops_size=28", "crops.local_crops_number=2",
         "dino.head_n_prototypes=256", "ibot.head_n_prototypes=256", "dino.head_hidden_dim=64",
         "ibot.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_bottleneck_dim=32",
         "student.depth=2", "student.block_chunks=0", "student.embed_dim=64", "student.num_heads=2", "train.batch_size_per_gpu=2",
         "data.num_workers=0"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="train/vits14.yaml")
    parser.add_argument("--batch", type=int, default=None, help="train.batch_size_per_gpu (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after two warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: the recipe's on CUDA, fp32 on CPU")
    parser.add_argument("--quick", action="store_true", help="tiny crops, model and heads, for a smoke run")
    parser.add_argument("--name", default=None, help="results file name (default train_step_<device>)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    overrides = ["data.num_workers=0"] if device.type == "cpu" else []
    if args.precision or device.type == "cpu":
        overrides.append(f"compute.precision={args.precision or 'fp32'}")
    if args.batch:
        overrides.append(f"train.batch_size_per_gpu={args.batch}")
    if args.quick:
        overrides += QUICK
        args.steps = min(args.steps, 2)
    overrides += args.overrides
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args.config, overrides, Path(tmp), args.device)
        try:
            cfg = trainer.cfg
            batches = prefetch_batches(trainer, 4)
            step = time_train_steps(trainer, batches, args.steps)
            bound = plain_backbone_ms(trainer, batches, args.steps)
            backend = trainer.model.student.backbone.attention_backend
        finally:
            trainer.close()
    rows = [{"part": "Trainer.train_step", "ms": step["ms_per_step"], "images_per_s": step["images_per_s"]},
            {"part": "plain backbone fwd+bwd (same crops)", "ms": bound["ms_fwd_bwd"]},
            {"part": "step / plain backbone (ratio)", "ms": step["ms_per_step"] / bound["ms_fwd_bwd"]}]
    meta = {"config": args.config, "overrides": overrides, "model": f"{cfg.student.arch}/{cfg.student.patch_size}",
            "batch": cfg.train.batch_size_per_gpu, "precision": str(cfg.compute.precision),
            "crops": f"2x{cfg.crops.global_crops_size} + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
            "drop_path_rate": cfg.student.drop_path_rate, "prototypes": cfg.dino.head_n_prototypes,
            "attention_backend": backend, "compile": bool(cfg.compute.compile), "device": str(device), **step}
    name = args.name or f"train_step_{device.type}"
    title = (f"Trainer.train_step, {meta['model']}, batch {meta['batch']}, {meta['crops']}, drop path "
             f"{meta['drop_path_rate']}, {meta['precision']}, attention {backend}: {step['images_per_s']:.2f} images/s "
             f"(batches prefetched: the input pipeline is benchmarked separately)")
    print(write_results(name, title, rows, ["part", "ms", "images_per_s"], meta).read_text())
    return meta


if __name__ == "__main__":
    main()
