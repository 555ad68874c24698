"""What a finished run prints: final losses, collapse monitors against their healthy ranges, the best
kNN, the last checkpoint, the plots, and the commands to export and evaluate the result."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from dinov2.checkpoint import CheckpointManager
from dinov2.logging.records import METRICS_FILE, read_metrics

LOSSES = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")
KNN_PREFIX = "knn_top1_k"


def best_knn(records: list[dict]) -> tuple[str, float, int] | None:
    """``(key, best top-1, its step)`` over every logged kNN value, or None when none was logged."""
    best = None
    for record in records:
        for key, value in record.items():
            if key.startswith(KNN_PREFIX) and (best is None or value > best[1]):
                best = (key, float(value), int(record["step"]))
    return best


def next_commands(run_dir: Path, cfg) -> list[str]:
    """Export the teacher (the file describes its architecture and input), evaluate it, and the same
    architecture at random initialisation as the baseline to beat."""
    backbone = run_dir / "backbone.safetensors"
    export = shlex.join(["dinov2-export", str(run_dir), str(backbone)])
    knn = ["dinov2-eval", "knn", "--backbone-file", str(backbone)]
    ev = cfg.evaluation
    if ev.dataset:
        if ev.val_dataset:
            data = ["--train", ev.dataset] + (["--train-labels", ev.labels] if ev.labels else [])
            data += ["--val", ev.val_dataset] + (["--val-labels", ev.val_labels] if ev.val_labels else [])
        else:
            data = ["--data", ev.dataset] + (["--labels", ev.labels] if ev.labels else [])
            data += ["--val-fraction", str(ev.val_fraction), "--split-seed", str(ev.split_seed)]
        data += ["--limit", str(ev.limit)] if ev.limit else []
        data_text, comment = shlex.join(data), ""
    else:
        data_text, comment = "--data LABELLED_DIR", "  # a folder with one sub-folder of images per class"
    return [export, f"{shlex.join(knn)} {data_text}{comment}",
            f"{shlex.join(knn)} --weights random {data_text}  # the baseline: same architecture, random init"]


def run_summary(run_dir: str | Path, cfg, result: dict) -> str:
    """A few lines for people: ``result`` is the trainer's last logged metrics (``Trainer.fit``)."""
    run_dir = Path(run_dir)
    lines = [f"dinov2-train: finished at step {result.get('step', 0)} in {run_dir}"]
    losses = [f"{key} {result[key]:.4f}" for key in LOSSES if key in result]
    if losses:
        lines.append("  final losses:    " + ", ".join(losses))
    if "teacher_entropy" in result:
        ln_k = math.log(cfg.dino.head_n_prototypes)
        lines.append(f"  teacher entropy: {result['teacher_entropy']:.3f} (ln K = {ln_k:.3f}: clearly below it is healthy)"
                     f", batch entropy {result.get('teacher_batch_entropy', float('nan')):.3f}")
    if "student_feature_std" in result:
        lines.append(f"  feature std:     {result['student_feature_std']:.3g} "
                     f"(healthy: of the order of 1/sqrt(D); near 0 is a collapse)")
    records = read_metrics(run_dir) if (run_dir / METRICS_FILE).exists() else []
    knn = best_knn(records)
    if knn is not None:
        lines.append(f"  best kNN:        {knn[1]:.2f} % top-1 ({knn[0].removeprefix('knn_top1_')}) at step {knn[2]}")
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    lines.append(f"  last checkpoint: {latest[1] if latest else 'none'}")
    plots = [name for name in ("loss_curve.png", "knn_curve.png", "monitors.png") if (run_dir / name).exists()]
    if plots:
        lines.append("  plots:           " + ", ".join(str(run_dir / name) for name in plots))
    if latest:
        lines.append("next:")
        lines += [f"  {command}" for command in next_commands(run_dir, cfg)]
    return "\n".join(lines)
