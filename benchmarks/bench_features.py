"""Frozen-feature extraction throughput (images/s): ViT-S/14 at 224, random init.

Two measurements per batch size:
- ``model``: the backbone call that ``dinov2.eval.extract_features`` makes per batch
  (``get_intermediate_layers(n=1, return_class_token=True)`` under inference mode), on
  ready tensors;
- ``pipeline``: ``extract_features`` end to end over an in-memory dataset of uint8
  images (PIL conversion, resize, crop, normalise, data loader in the main process), i.e.
  what ``dinov2-eval knn|linear|features`` costs per image.
Run: ``python -m benchmarks.bench_features`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

import numpy as np
import torch

from benchmarks.common import time_call, write_results
from dinov2.data import NumpyArrayDataset
from dinov2.eval.data import eval_transform
from dinov2.eval.features import embed_batch, extract_features
from dinov2.hub.backbones import load_backbone


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov2_vits14", help="hub name (random init)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per batch size (median)")
    parser.add_argument("--pipeline-batches", type=int, default=2,
                        help="batches of images through extract_features (0: skip the pipeline rows)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--name", default="features", help="results file name (results/<name>.json|md)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.img_size, args.batch_sizes, args.repeats, args.pipeline_batches = 56, [4], 1, 1
    device = torch.device(args.device)
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    load_start = os.getloadavg()

    torch.manual_seed(0)
    model = load_backbone(args.backbone, weights=None).to(device).eval()
    rows = []
    for bs in args.batch_sizes:
        x = torch.randn(bs, 3, args.img_size, args.img_size, device=device)

        def forward():
            with autocast:
                return embed_batch(model, x)

        ms = time_call(forward, device, warmup=1, repeats=args.repeats)
        rows.append({"what": "model", "batch": bs, "images": bs, "ms_per_batch": ms, "images_per_s": 1e3 * bs / ms})
        print(rows[-1], flush=True)
        if args.pipeline_batches > 0:
            n = bs * args.pipeline_batches
            rng = np.random.default_rng(0)
            # Source images a bit larger than the crop, as real photos would be resized down.
            side = int(args.img_size * 1.25)
            images = rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8)
            ds = NumpyArrayDataset(images, np.zeros(n, dtype=np.int64), transform=eval_transform(args.img_size))
            start = time.perf_counter()
            extract_features(model, ds, batch_size=bs, autocast_dtype=dtype, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            sec = time.perf_counter() - start
            rows.append({"what": "pipeline", "batch": bs, "images": n, "ms_per_batch": 1e3 * sec / args.pipeline_batches,
                         "images_per_s": n / sec})
            print(rows[-1], flush=True)

    meta = {
        "backbone": args.backbone,
        "weights": "random init",
        "img_size": args.img_size,
        "device": str(device),
        "autocast": args.autocast,
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    path = write_results(
        args.name,
        f"Feature extraction, {args.backbone} at {args.img_size}x{args.img_size} ({device.type}, autocast "
        f"{args.autocast}); load average {meta['load_average_start']} -> {meta['load_average_end']}",
        rows,
        ["what", "batch", "images", "ms_per_batch", "images_per_s"],
        meta,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
