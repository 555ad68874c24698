"""Does ``configs/train/small_rgb.yaml`` learn on a small folder of real photos on a CPU?

    python -m benchmarks.small_rgb --output-dir outputs/small_rgb [--train-per-class 12] [key=value ...]

The photos are the ones that ship with scikit-image (astronaut, chelsea the cat, coffee, the Hubble
deep field, immunohistochemistry, a rocket, a retina, the cameraman, coins, brick, grass, gravel).
Each photo gives random crops (10-50 % of its area, aspect 3:4-4:3, random flip) saved as JPEGs:
an unlabelled training folder, and a disjoint labelled hold-out (one class per source photo:
"which photo is this crop from?") for the kNN during and after training. Reports the teacher entropy
against ln K (uniform collapse sits at ln K) and kNN top-1 of the learned teacher, the same
architecture at random initialisation, and raw pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SOURCES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket", "retina",
           "camera", "coins", "brick", "grass", "gravel")
SIDE = 128  # saved crops are SIDE x SIDE pixels


def _photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    return Image.fromarray(array).convert("RGB")


def random_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of 10-50 % of the photo's area, aspect ratio in [3/4, 4/3], maybe flipped, resized to SIDE."""
    width, height = photo.size
    for _ in range(100):
        area = width * height * rng.uniform(0.1, 0.5)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            break
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = photo.crop((x, y, x + w, y + h)).resize((SIDE, SIDE), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def make_photo_folders(root: str | Path, train_per_class: int = 12, eval_per_class: int = 25, seed: int = 0,
                       sources: tuple[str, ...] = SOURCES) -> tuple[Path, Path]:
    """``root/train/*.jpg`` (unlabelled) and ``root/eval/<photo>/*.jpg`` (labelled), from different crops."""
    root = Path(root)
    train, held_out = root / "train", root / "eval"
    rng = np.random.default_rng(seed)
    for name in sources:
        photo = _photo(name)
        (held_out / name).mkdir(parents=True, exist_ok=True)
        train.mkdir(parents=True, exist_ok=True)
        for index in range(train_per_class):
            random_crop(photo, rng).save(train / f"{name}_{index:03d}.jpg", quality=90)
        for index in range(eval_per_class):
            random_crop(photo, rng).save(held_out / name / f"{index:03d}.jpg", quality=90)
    return train, held_out


def raw_pixel_knn(cfg) -> float:
    from dinov2.eval.knn import knn_classify
    from dinov2.train.knn_monitor import KnnMonitor

    splits = KnnMonitor(cfg).splits

    def pixels(dataset):
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
        return torch.stack(xs).flatten(1).float(), torch.as_tensor(ys)
    (train_x, train_y), (val_x, val_y) = pixels(splits.train), pixels(splits.val)
    k = cfg.evaluation.ks[0]
    return knn_classify(train_x, train_y, val_x, val_y, ks=(k,))["results"][str(k)]["top1"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/small_rgb")
    parser.add_argument("--config", default="train/small_rgb.yaml")
    parser.add_argument("--train-per-class", type=int, default=12, help="training crops per photo (12 x 12 = 144)")
    parser.add_argument("--eval-per-class", type=int, default=25)
    parser.add_argument("--fresh", action="store_true", help="start the run over")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)

    from dinov2.compute import intra_op_threads
    from dinov2.configs import load_config
    from dinov2.logging import read_metrics
    from dinov2.train.knn_monitor import KnnMonitor
    from dinov2.train.ssl_meta_arch import build_backbone
    from dinov2.train.train import Trainer

    out = Path(args.output_dir)
    train, held_out = make_photo_folders(out / "photos", args.train_per_class, args.eval_per_class)
    overrides = [f"data.dataset=folder:{train}", f"evaluation.dataset={held_out}", "evaluation.knn_every_n_steps=50",
                 "evaluation.val_fraction=0.5", *args.overrides]
    cfg = load_config(args.config, overrides)
    started = time.perf_counter()
    trainer = Trainer(cfg, out / "run", resume=not args.fresh)
    with intra_op_threads(cfg.compute.num_threads):  # as dinov2-train runs it
        trainer.fit()
    minutes = (time.perf_counter() - started) / 60
    records = read_metrics(out / "run")
    monitor = KnnMonitor(cfg)
    k = cfg.evaluation.ks[0]
    torch.manual_seed(cfg.train.seed)
    random_init = build_backbone(cfg.student, cfg.crops.global_crops_size, with_drop_path=False)
    entropy = [(r["step"], r["teacher_entropy"]) for r in records if "teacher_entropy" in r]
    knn = [(r["step"], r[f"knn_top1_k{k}"]) for r in records if f"knn_top1_k{k}" in r]
    result = {
        "images": len(trainer.dataset), "steps": trainer.step, "train_minutes": round(minutes, 2),
        "torch_threads": torch.get_num_threads(),
        "ln_K": math.log(cfg.dino.head_n_prototypes),
        "teacher_entropy_first_last": [entropy[0], entropy[-1]] if entropy else None,
        "knn_curve": knn,
        "knn_learned": monitor(trainer.model.teacher.backbone)[f"knn_top1_k{k}"],
        "knn_random_init": monitor(random_init)[f"knn_top1_k{k}"],
        "knn_raw_pixels": raw_pixel_knn(cfg),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
