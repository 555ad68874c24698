"""Optional experiment trackers: MLflow (``logging.mlflow``) and Weights & Biases (``logging.wandb``).

Each is used only when its package is installed (a warning says so otherwise) and receives the same
records as metrics.jsonl, under the grouped names TensorBoard uses (``loss/total_loss``...), plus the
resolved config as parameters. A resumed run continues the same tracker run: its id is kept in
``RUN_DIR/trackers.json``. Where the records go is each tool's own setting: ``MLFLOW_TRACKING_URI``
(MLflow >= 3 refuses its local file store ``file:./mlruns`` unless ``MLFLOW_ALLOW_FILE_STORE=true``),
``WANDB_MODE=offline`` / ``WANDB_DIR`` for W&B.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Mapping, Protocol

logger = logging.getLogger(__name__)

IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def flat_params(config: Mapping, prefix: str = "") -> dict[str, str]:
    """``{"optim.base_lr": "0.004", ...}`` from a nested mapping (trackers take flat string parameters)."""
    params = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)
    return params


def _stored_ids(run_dir: Path) -> dict:
    path = run_dir / IDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _store_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = {**_stored_ids(run_dir), name: run_id}
    temporary = run_dir / f".{IDS_FILE}.tmp"
    temporary.write_text(json.dumps(ids, indent=2) + "\n")
    temporary.replace(run_dir / IDS_FILE)


class MLflowTracker:
    """Through ``MlflowClient`` (no global active run): one MLflow run per training run."""

    def __init__(self, run_dir: Path, experiment: str, params: Mapping[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        run_id = _stored_ids(run_dir).get("mlflow")
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            self._log_params(run_id, params)
            _store_id(run_dir, "mlflow", run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        logger.info("MLflow: run %s at %s", run_id, self.client.tracking_uri)

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    def __init__(self, run_dir: Path, experiment: str, params: Mapping[str, str]) -> None:
        import wandb

        stored = _stored_ids(run_dir).get("wandb")
        self.run = wandb.init(project=experiment, name=run_dir.name, dir=str(run_dir), config=dict(params),
                              id=stored, resume="allow" if stored else None)
        if stored is None:
            _store_id(run_dir, "wandb", self.run.id)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)  # W&B ignores steps below its last one (after a resume)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"mlflow": ("mlflow", MLflowTracker), "wandb": ("wandb", WandbTracker)}


def build_trackers(run_dir: str | Path, wanted: Mapping[str, bool], experiment: str,
                   params: Mapping[str, str]) -> list[Tracker]:
    """The trackers switched on in ``wanted`` (``{"mlflow": True, ...}``) whose package is installed."""
    trackers = []
    for name, on in wanted.items():
        if not on:
            continue
        package, factory = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            logger.warning("logging.%s=true but %s is not installed (pip install %s): not logging to it",
                           name, package, "mlflow-skinny" if name == "mlflow" else package)
            continue
        trackers.append(factory(Path(run_dir), experiment, params))
    return trackers
