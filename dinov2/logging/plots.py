"""Loss-curve PNG from a run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics

CURVES = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")


def plot_loss_curve(run_dir: str | Path, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no metrics to plot")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in CURVES:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, linewidth=2 if key == "total_loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("DINOv2 training losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
