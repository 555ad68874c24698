"""The plots of a run, from its metrics.jsonl: loss_curve.png, knn_curve.png (when kNN was logged) and
monitors.png (collapse monitors against ln K). Every run draws them when it ends; ``dinov2-plot RUN_DIR``
(dinov2/cli/plot.py) redraws them (e.g. during a run, or after one that was killed).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .records import read_metrics

CURVES = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")
MONITORS = ("teacher_entropy", "teacher_batch_entropy")
KNN_PREFIX = "knn_top1_"


@contextmanager
def _axes() -> Iterator:
    """``(fig, ax)`` of one 7x4 in figure on the Agg backend, closed afterwards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        yield fig, ax
    finally:
        plt.close(fig)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    steps = [r["step"] for r in rows if key in r]
    return steps, [r[key] for r in rows if key in r]


def _save(fig, ax, title: str, ylabel: str, out_path: str | Path, extra_axes=()) -> Path:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    for other in extra_axes:  # one legend for every axis (a twin axis would hide the first legend)
        more_handles, more_labels = other.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path)
    return Path(out_path)


def plot_loss_curve(run_dir: str | Path, out_path: str | Path) -> Path:
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no metrics to plot")
    with _axes() as (fig, ax):
        for key in CURVES:
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, label=key, linewidth=2 if key == "total_loss" else 1)
        return _save(fig, ax, "DINOv2 training losses", "loss", out_path)


def knn_keys(rows: list[dict]) -> list[str]:
    return sorted({key for row in rows for key in row if key.startswith(KNN_PREFIX)})


def plot_knn_curve(run_dir: str | Path, out_path: str | Path) -> Path:
    rows = read_metrics(run_dir)
    keys = knn_keys(rows)
    if not keys:
        raise ValueError(f"{run_dir} has no kNN metrics to plot (evaluation.knn_every_n_steps was 0)")
    with _axes() as (fig, ax):
        for key in keys:
            steps, values = _series(rows, key)
            ax.plot(steps, values, marker="o", label=key.removeprefix(KNN_PREFIX))
        return _save(fig, ax, "kNN top-1 of the teacher on the labelled hold-out", "top-1 %", out_path)


def plot_monitors(run_dir: str | Path, out_path: str | Path, n_prototypes: int | None = None) -> Path:
    """Teacher entropies (with ln K, where uniform collapse sits) and the student feature std."""
    rows = read_metrics(run_dir)
    if not any(key in row for row in rows for key in MONITORS):
        raise ValueError(f"{run_dir} has no collapse monitors to plot")
    with _axes() as (fig, ax):
        for key in MONITORS:
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, label=key)
        if n_prototypes:
            ax.axhline(math.log(n_prototypes), color="k", linestyle="--", linewidth=1,
                       label=f"ln K = {math.log(n_prototypes):.2f} (uniform collapse)")
        steps, values = _series(rows, "student_feature_std")
        extra = []
        if steps:
            right = ax.twinx()
            right.plot(steps, values, color="tab:red", linewidth=1, label="student_feature_std (right axis)")
            right.set_ylabel("feature std (near 0 = collapse)")
            right.set_ylim(bottom=0)
            extra.append(right)
        return _save(fig, ax, "Collapse monitors", "entropy (nats)", out_path, extra)


def _n_prototypes(run_dir: Path) -> int | None:
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    return ((yaml.safe_load(path.read_text()) or {}).get("dino") or {}).get("head_n_prototypes")


def write_plots(run_dir: str | Path) -> list[Path]:
    """Draw every plot the run's metrics allow into ``run_dir``; return the files written."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    written = [plot_loss_curve(run_dir, run_dir / "loss_curve.png")]
    if knn_keys(rows):
        written.append(plot_knn_curve(run_dir, run_dir / "knn_curve.png"))
    if any(key in row for row in rows for key in MONITORS):
        written.append(plot_monitors(run_dir, run_dir / "monitors.png", _n_prototypes(run_dir)))
    return written
