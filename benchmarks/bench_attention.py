"""Packed student pass vs alternatives: ViT-S/14 over 2 global + 8 local crops per image.

Variants, all on the same weights and inputs:
- packed (one pass) with each usable kernel: per group of equal-length crops (sdpa, math) or one
  kernel over the whole packed sequence (varlen, xformers; when their probe passes),
- one boolean block-diagonal mask over the packed sequence (``sdpa_masked``),
- one backbone call per crop size (what a non-packing trainer does).
Times forward (no grad) and forward+backward; ratios are against ``packed sdpa`` in the same run.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch

from benchmarks.common import time_call, write_results
from dinov2.layers.attention_backends import probe_backend
from dinov2.models.vision_transformer import vit_small


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="images per step (each gives 2 global + N local crops)")
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--name", default=None, help="results file name (default attention_<device>)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.batch, args.local_crops, args.global_size, args.local_size, args.repeats = 1, 2, 56, 28, 1
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    torch.manual_seed(0)
    model = vit_small(patch_size=14, img_size=args.global_size, init_values=1.0, block_chunks=0).to(device).train()
    global_crops = torch.randn(2 * args.batch, 3, args.global_size, args.global_size, device=device)
    local_crops = torch.randn(args.local_crops * args.batch, 3, args.local_size, args.local_size, device=device)

    def packed():
        return model.forward_features([global_crops, local_crops])

    def per_crop_size():
        return [model.forward_features(global_crops), model.forward_features(local_crops)]

    def loss_of(outputs):
        return sum(o["x_norm_clstoken"].float().pow(2).mean() + o["x_norm_patchtokens"].float().pow(2).mean()
                   for o in outputs)

    variants = [("packed", "sdpa", packed), ("packed", "math", packed), ("packed", "sdpa_masked", packed),
                ("per crop size", "sdpa", per_crop_size)]
    probes = {name: probe_backend(name, device, dtype) for name in ("varlen", "xformers")}
    for name in ("xformers", "varlen"):  # only kernels that pass a forward+backward probe in this dtype
        if probes[name].ok:
            variants.insert(1, ("packed", name, packed))

    rows = []
    for mode, backend, run in variants:
        model.set_attention_backend(backend)

        def forward():
            with torch.no_grad(), autocast:
                run()

        def forward_backward():
            with autocast:
                loss = loss_of(run())
            loss.backward()
            model.zero_grad(set_to_none=True)

        rows.append({
            "variant": f"{mode} / {backend}",
            "forward_ms": time_call(forward, device, repeats=args.repeats),
            "fwd_bwd_ms": time_call(forward_backward, device, repeats=args.repeats),
        })
        print(rows[-1], flush=True)
    base = rows[0]
    for row in rows:
        row["forward_vs_packed_sdpa"] = row["forward_ms"] / base["forward_ms"]
        row["fwd_bwd_vs_packed_sdpa"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]

    tokens = 2 * args.batch * ((args.global_size // 14) ** 2 + 1) + args.local_crops * args.batch * ((args.local_size // 14) ** 2 + 1)
    meta = {"model": "ViT-S/14", "batch": args.batch, "crops": f"2x{args.global_size} + {args.local_crops}x{args.local_size}",
            "tokens_per_step": tokens, "dtype": dtype_name, "device": str(device),
            "probes": {name: "ok" if p.ok else p.error for name, p in probes.items()}}
    name = args.name or f"attention_{device.type}"
    title = (f"Student pass, ViT-S/14, batch {args.batch} x (2x{args.global_size} + {args.local_crops}x{args.local_size}), "
             f"{dtype_name}, ms (ratio vs packed sdpa)")
    path = write_results(name, title, rows, ["variant", "forward_ms", "fwd_bwd_ms", "forward_vs_packed_sdpa",
                                             "fwd_bwd_vs_packed_sdpa"], meta)
    print(path.read_text())


if __name__ == "__main__":
    main()
