"""``dinov2-plot RUN_DIR``: (re)draw a run's plots from its metrics.jsonl (e.g. during a run, or after one
that was killed); the plots are ``dinov2.logging.plots.write_plots``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dinov2.logging.plots import write_plots
from dinov2.logging.records import MetricsFileError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="dinov2-plot", description="(Re)draw a training run's plots from its metrics.jsonl: loss_curve.png, "
        "knn_curve.png (when kNN was logged) and monitors.png, into the run directory.",
        epilog="Example: dinov2-plot runs/mine",
    )
    parser.add_argument("run_dir", help="a dinov2-train output directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"dinov2-plot: error: {run_dir / 'metrics.jsonl'} not found (is {run_dir} a training run directory?)",
              file=sys.stderr)
        return 2
    try:
        written = write_plots(run_dir)
    except (MetricsFileError, OSError) as error:
        print(f"dinov2-plot: error: {error}", file=sys.stderr)
        return 2
    if not written:
        print(f"dinov2-plot: {run_dir / 'metrics.jsonl'} has no records yet", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
