"""What a run leaves to look at: grouped TensorBoard tags, the plots (and ``dinov2-plot``), MLflow
through its local file store, and a console free of the faiss loader's import noise."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from dinov2.configs import load_config
from dinov2.logging import read_metrics
from dinov2.logging.metrics import grouped_name
from dinov2.cli.plot import main as plot_main
from dinov2.logging.trackers import IDS_FILE, build_trackers, flat_params
from dinov2.train.train import Trainer
from gloo_ranks import write_dataset
from tiny import TINY


@pytest.mark.parametrize("key, tag", [
    ("total_loss", "loss/total_loss"), ("dino_local_crops_loss", "loss/dino_local_crops_loss"),
    ("koleo_loss", "loss/koleo_loss"), ("lr", "optim/lr"), ("teacher_temp", "optim/teacher_temp"),
    ("grad_norm_backbone", "optim/grad_norm_backbone"), ("teacher_entropy", "monitor/teacher_entropy"),
    ("student_feature_std", "monitor/student_feature_std"), ("nonfinite_steps", "monitor/nonfinite_steps"),
    ("knn_top1_k20", "eval/knn_top1_k20"),
])
def test_grouped_names(key, tag):
    assert grouped_name(key) == tag


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step tiny run with TensorBoard and a kNN monitor on a labelled npy set."""
    import numpy as np

    root = tmp_path_factory.mktemp("logging")
    data = write_dataset(root / "images.npy", n=16)
    labels = root / "labels.npy"
    np.save(labels, np.arange(16) % 2)
    cfg = load_config(None, TINY + [data, "train.max_steps=4", "logging.tensorboard=true",
                                    "evaluation.knn_every_n_steps=2", f"evaluation.dataset={root / 'images.npy'}",
                                    f"evaluation.labels={labels}", "evaluation.ks=[3]", "evaluation.img_size=28"])
    Trainer(cfg, root / "run").fit()
    return root / "run"


def test_tensorboard_tags_are_grouped_and_jsonl_keys_unchanged(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = read_metrics(finished_run)
    keys = {key for record in records for key in record if key != "step"}
    assert tags == {grouped_name(key) for key in keys}
    assert {tag.split("/")[0] for tag in tags} == {"loss", "monitor", "optim", "eval"}
    assert "total_loss" in keys and "knn_top1_k3" in keys  # metrics.jsonl keeps plain keys
    assert [e.value for e in events.Scalars("loss/total_loss")] == pytest.approx(
        [r["total_loss"] for r in records if "total_loss" in r])


def test_every_run_draws_its_plots_and_dinov2_plot_redraws_them(finished_run, capsys):
    names = ("loss_curve.png", "knn_curve.png", "monitors.png")
    for name in names:
        with Image.open(finished_run / name) as image:
            assert image.format == "PNG" and image.size == (700, 400)
        (finished_run / name).unlink()
    assert plot_main([str(finished_run)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {finished_run / name}" for name in names]
    assert all((finished_run / name).stat().st_size > 0 for name in names)


def test_dinov2_plot_errors_are_clear(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "-m", "dinov2.cli.plot", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "dinov2-plot" in result.stdout


def test_faiss_loader_noise_is_silenced():
    # faiss logs every optional SIMD build it fails to import as an INFO ModuleNotFoundError.
    noisy = "import logging; logging.basicConfig(level=logging.INFO); import faiss"
    quiet = "from dinov2.logging.console import setup_logging; setup_logging(); import faiss, logging; " \
            "logging.getLogger('dinov2').info('still shown')"
    before = subprocess.run([sys.executable, "-c", noisy], capture_output=True, text=True, check=True)
    after = subprocess.run([sys.executable, "-c", quiet], capture_output=True, text=True, check=True)
    if "faiss.loader" not in before.stderr:
        pytest.skip("this faiss build logs nothing at INFO")
    assert "faiss.loader" not in after.stderr and "ModuleNotFoundError" not in after.stderr
    assert "still shown" in after.stderr


def test_flat_params():
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_a_tracker_that_is_not_installed_is_skipped_with_a_warning(tmp_path, caplog, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert build_trackers(tmp_path, {"wandb": True, "mlflow": False}, "x", {}) == []
    assert "logging.wandb=true but wandb is not installed" in caplog.text


def test_mlflow_local_file_store_gets_the_metrics_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is a test dependency (pip install mlflow-skinny)")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3 asks for this to use the file store
    data = write_dataset(tmp_path / "images.npy", n=16)
    overrides = TINY + [data, "logging.mlflow=true", "logging.experiment=tiny", "logging.plots=false"]
    run = tmp_path / "run"
    Trainer(load_config(None, overrides + ["train.max_steps=2"]), run).fit()
    run_id = json.loads((run / IDS_FILE).read_text())["mlflow"]
    Trainer(load_config(None, overrides + ["train.max_steps=4"]), run).fit()  # resumes: same MLflow run
    assert json.loads((run / IDS_FILE).read_text())["mlflow"] == run_id

    client = MlflowClient(tracking_uri=store)
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "run"
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "tiny"
    assert mlflow_run.data.params["dino.head_n_prototypes"] == "64"
    history = client.get_metric_history(run_id, "loss/total_loss")
    records = read_metrics(run)
    assert sorted(m.step for m in history) == [r["step"] for r in records] == [1, 2, 3, 4]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["total_loss"] for r in records])
