"""Training metrics to a jsonl file (one object per logged step), to TensorBoard, and optionally to
MLflow / Weights & Biases (trackers.py); the plots of a run (plots.py) are drawn when it closes.

TensorBoard and the trackers group the keys (``loss/``, ``monitor/``, ``optim/``, ``eval/``, see
:func:`grouped_name`); metrics.jsonl keeps the plain keys.

Crash safety: each line is appended in one write; a process killed mid-write leaves at most a torn
last line, which readers drop with a warning. On resume, lines beyond the checkpoint's step are
removed by writing a new file and renaming it over the old one (a kill at that moment leaves the
old file or the new one, never an empty one), and TensorBoard purges its events beyond that step.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from .records import METRICS_FILE, _records

logger = logging.getLogger(__name__)

OPTIM_KEYS = ("lr", "last_layer_lr", "weight_decay", "teacher_momentum", "teacher_temp")


def grouped_name(key: str) -> str:
    """``total_loss`` -> ``loss/total_loss``; lr, schedules, gradient norms -> ``optim/``; kNN -> ``eval/``;
    the rest (collapse monitors, counters, time) -> ``monitor/``."""
    if key.endswith("_loss"):
        group = "loss"
    elif key.startswith("knn_"):
        group = "eval"
    elif key in OPTIM_KEYS or key.startswith("grad_norm"):
        group = "optim"
    else:
        group = "monitor"
    return f"{group}/{key}"


class MetricsWriter:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int = 0, *, trackers: Sequence = (), plots: bool = False) -> None:
        """``resume_step``: the step the run continues from; later lines and events are removed.
        ``trackers``: MLflow / W&B (trackers.py); ``plots``: draw the run's plots on close."""
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = None
        self.trackers = list(trackers) if enabled else []
        self.plots = plots
        if not enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at steps >= it (written after the checkpoint) are hidden on reload.
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step > 0 else None)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(grouped_name(key), value, step)
        if self.trackers:
            grouped = {grouped_name(key): value for key, value in values.items()}
            for tracker in self.trackers:
                tracker.log(step, grouped)

    @classmethod
    def for_run(cls, output_dir: str | Path, cfg, *, enabled: bool = True, resume_step: int = 0) -> "MetricsWriter":
        """The writer a training run's ``logging`` config asks for (trackers get the config as parameters)."""
        from .trackers import build_trackers, flat_params

        log = cfg.logging
        trackers = []
        if enabled and (log.mlflow or log.wandb):
            from omegaconf import OmegaConf

            params = flat_params(OmegaConf.to_container(cfg, resolve=True))
            trackers = build_trackers(output_dir, {"mlflow": log.mlflow, "wandb": log.wandb}, log.experiment, params)
        return cls(output_dir, tensorboard=log.tensorboard, enabled=enabled, resume_step=resume_step,
                   trackers=trackers, plots=log.plots)

    def _truncate_after(self, step: int) -> None:
        """Keep the lines up to ``step`` (a resumed run rewrites the later ones), atomically."""
        if not self.path.exists():
            return
        size = self.path.stat().st_size
        kept = [line for line, record in _records(self.path) if record["step"] <= step]
        text = "".join(line + "\n" for line in kept)
        if len(text.encode()) == size:
            return  # nothing beyond the step and no torn line: leave the file alone
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with temporary.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self.enabled and self.plots and self.path.exists():
            from .plots import write_plots

            try:
                write_plots(self.path.parent)
            except Exception as error:  # noqa: BLE001 - a plot never fails a run; the metrics are on disk
                logger.warning("could not draw the plots of %s: %s (dinov2-plot %s retries)", self.path.parent,
                               error, self.path.parent)
