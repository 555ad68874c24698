"""One DINOv2 train step, split into its parts, against a plain backbone doing the same token work.

ViT-S/14 with the vits14 recipe heads, 2 global + 8 local crops per image. Parts: data (multi-crop
+ masks + collate for one batch, one process), teacher (targets), student forward (+ losses),
backward, optimizer (clip + AdamW), EMA. Lower bound: the same backbone, forward+backward over the
same crops with no heads, no teacher, no losses. Ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

from benchmarks.common import synchronize, write_results
from dinov2.configs import load_config
from dinov2.train.build import batch_to_device, build_train_loader
from dinov2.train.param_groups import build_param_groups
from dinov2.train.ssl_meta_arch import SSLMetaArch


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        rng = np.random.default_rng(index)
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)), -1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--config", default="train/vits14.yaml")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--quick", action="store_true", help="tiny crops and heads, for a smoke run")
    parser.add_argument("--name", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    overrides = [f"train.batch_size_per_gpu={args.batch}", "data.num_workers=0", "student.drop_path_rate=0.1",
                 f"compute.precision={precision}", *args.overrides]
    if args.quick:
        overrides += ["crops.global_crops_size=56", "crops.local_crops_size=28", "crops.local_crops_number=2",
                      "dino.head_n_prototypes=256", "ibot.head_n_prototypes=256", "student.depth=2"]
        args.batch, args.steps = 2, 1
        overrides[0] = "train.batch_size_per_gpu=2"
    cfg = load_config(args.config, overrides)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).to(device).train()
    optimizer = torch.optim.AdamW(
        build_param_groups(model.student.named_parameters(), model.student.backbone.n_blocks), lr=1e-4,
        fused=True if device.type == "cuda" else None,
    )
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    loader = iter(build_train_loader(cfg, RandomImages(64, 256), start=0))

    def timed(fn):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        return out, (time.perf_counter() - start) * 1e3

    parts = {k: [] for k in ("data", "teacher", "student_forward", "backward", "optimizer", "ema", "step_total",
                             "plain_backbone_fwd_bwd")}
    for step in range(args.steps + 1):
        cpu_batch, t_data = timed(lambda: next(loader))
        batch = batch_to_device(cpu_batch, device)
        with autocast:
            _, t_teacher = timed(lambda: model.teacher_targets(batch, 0.04))
            (loss, _), t_forward = timed(lambda: model(batch, 0.04))
        _, t_backward = timed(loss.backward)

        def optimize():
            for module in model.student.values():
                torch.nn.utils.clip_grad_norm_(module.parameters(), 3.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _, t_opt = timed(optimize)
        _, t_ema = timed(lambda: model.update_teacher(0.994))

        def plain():
            backbone = model.student.backbone
            with autocast:
                outs = [backbone.forward_features(batch["collated_global_crops"]),
                        backbone.forward_features(batch["collated_local_crops"])]
                total = sum(o["x_norm_clstoken"].float().sum() + o["x_norm_patchtokens"].float().sum() for o in outs)
            total.backward()
            optimizer.zero_grad(set_to_none=True)

        _, t_plain = timed(plain)
        if step == 0:
            continue  # warm-up
        student = t_forward - t_teacher  # model() includes the teacher pass
        for key, value in zip(parts, (t_data, t_teacher, student, t_backward, t_opt, t_ema,
                                      t_forward + t_backward + t_opt + t_ema, t_plain)):
            parts[key].append(value)
        print({k: round(v[-1], 1) for k, v in parts.items()}, flush=True)

    median = {k: float(np.median(v)) for k, v in parts.items()}
    rows = [{"part": k, "ms": v, "share_of_step": v / median["step_total"]} for k, v in median.items()]
    rows.append({"part": "step / plain backbone (ratio)", "ms": "", "share_of_step": median["step_total"] / median["plain_backbone_fwd_bwd"]})
    images_per_s = 1e3 * args.batch / median["step_total"]
    meta = {"model": f"{cfg.student.arch}/{cfg.student.patch_size}", "batch": args.batch, "precision": precision,
            "crops": f"2x{cfg.crops.global_crops_size} + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
            "prototypes": cfg.dino.head_n_prototypes, "images_per_s": images_per_s, "device": str(device)}
    name = args.name or f"train_step_{device.type}"
    title = (f"Train step, {meta['model']}, batch {args.batch}, {meta['crops']}, {precision}: "
             f"{images_per_s:.2f} images/s (step excludes data loading, which runs in workers)")
    print(write_results(name, title, rows, ["part", "ms", "share_of_step"], meta).read_text())


if __name__ == "__main__":
    main()
