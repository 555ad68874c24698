"""What a distillation teacher's heads tell the student: target statistics per head method (README, Distillation).

For a teacher (a run directory of ours: its trained heads; or any teacher: k-means and random heads fitted as
the trainer fits them), the teacher's class and patch tokens of the kNN monitor's labelled training images
(centre crops, ``evaluation.*`` of the config), their head logits, centred by the data mean and sharpened at
the teacher temperature, then ``dinov2.train.teacher_heads.target_statistics``: per-sample entropy (the floor
of the student's loss), information about the image, and about the label.

    python -m benchmarks.distill_targets --teacher runs/teacher --config train/demo_mnist.yaml
"""

from __future__ import annotations

import argparse
import types

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table
from dinov2.configs import load_config
from dinov2.train.build import build_dataset
from dinov2.train.distillation import DistillationMetaArch, fit_teacher_heads
from dinov2.train.knn_monitor import KnnMonitor
from dinov2.train.teacher_heads import target_statistics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="distillation.teacher (a run directory for 'trained')")
    parser.add_argument("--config", default="train/demo_mnist.yaml")
    parser.add_argument("--heads", nargs="+", default=["trained", "kmeans", "random"])
    parser.add_argument("--temperature", type=float, default=None, help="default: teacher.teacher_temp")
    parser.add_argument("overrides", nargs="*", help="config overrides (the student's prototype counts matter)")
    return parser.parse_args(argv)


@torch.no_grad()
def head_rows(cfg, images: torch.Tensor, labels: torch.Tensor, temperature: float) -> list[dict]:
    torch.manual_seed(cfg.train.seed)
    model = DistillationMetaArch(cfg).eval()
    env = types.SimpleNamespace(device=torch.device("cpu"), is_distributed=False)
    fit_teacher_heads(model, cfg, build_dataset(cfg.data.dataset, cfg.student.in_chans), env)
    out = model.teacher.backbone(model.teacher_input(images), is_training=True)
    patches = out["x_norm_patchtokens"]
    tokens = {"class token": (out["x_norm_clstoken"], model.teacher.dino_head, labels),
              "patch tokens": (patches.flatten(0, 1), model._ibot_head(model.teacher),
                               labels.repeat_interleave(patches.shape[1]))}
    rows = []
    for name, (features, head, token_labels) in tokens.items():
        logits = head(features)
        targets = F.softmax((logits - logits.mean(0)) / temperature, dim=-1)
        stats = target_statistics(targets, token_labels)
        rows.append({"heads": model.head_method, "tokens": name, **{k: round(v, 3) for k, v in stats.items()}})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for heads in args.heads:
        cfg = load_config(args.config, [*args.overrides, f"distillation.teacher={args.teacher}",
                                        f"distillation.heads={heads}", "data.num_workers=0"])
        monitor = KnnMonitor(cfg)
        images, labels = zip(*(monitor.splits.train[i] for i in range(len(monitor.splits.train))))
        temperature = args.temperature if args.temperature is not None else cfg.teacher.teacher_temp
        rows += head_rows(cfg, torch.stack(images), torch.tensor(labels), temperature)
    print(f"{len(labels)} labelled images, teacher temperature {temperature}")
    print(markdown_table(rows, ["heads", "tokens", "entropy", "marginal_entropy", "information", "label_information"]))


if __name__ == "__main__":
    main()
