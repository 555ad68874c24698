"""Collapse warnings (each collapse built for real and measured with the objective's own monitor) and
the human summary at the end of a run."""

import logging
import math
import shlex

import pytest
import torch
import torch.nn.functional as F

from dinov2.configs import load_config
from dinov2.logging import read_metrics
from dinov2.train.health import CollapseWatch, collapse_problems
from dinov2.train.ssl_meta_arch import _entropy
from dinov2.train.summary import best_knn, run_summary
from dinov2.cli.train import main
from dinov2.train.train import Trainer
from gloo_ranks import write_dataset
from tiny import TINY

K, D, B = 256, 128, 64


def monitors(teacher_probs: torch.Tensor, student_cls: torch.Tensor) -> dict:
    """The three monitors exactly as SSLMetaArch computes them."""
    return {
        "teacher_entropy": float(_entropy(teacher_probs).mean()),
        "teacher_batch_entropy": float(_entropy(teacher_probs.mean(0))),
        "student_feature_std": float(F.normalize(student_cls, dim=-1).std(dim=0).mean()),
    }


def healthy():
    generator = torch.Generator().manual_seed(0)
    # Confident teacher, images spread over prototypes, features spread over the sphere.
    probs = torch.softmax(torch.randn(B, K, generator=generator) / 0.1, dim=-1)
    return probs, torch.randn(B, D, generator=generator)


def test_healthy_monitors_raise_nothing():
    probs, features = healthy()
    values = monitors(probs, features)
    assert values["teacher_entropy"] < 0.5 * math.log(K)
    assert values["student_feature_std"] == pytest.approx(1 / math.sqrt(D), rel=0.2)  # the documented healthy scale
    assert collapse_problems(values, K, D) == []


def test_uniform_collapse_is_named():
    probs, features = healthy()
    values = monitors(torch.full((B, K), 1.0 / K), features)
    assert values["teacher_entropy"] == pytest.approx(math.log(K))  # exactly ln K, as in the run
    (problem,) = collapse_problems(values, K, D)
    assert problem.kind == "uniform" and f"ln K = {math.log(K):.3f}" in problem.message


def test_one_prototype_collapse_is_named():
    _, features = healthy()
    one_hot = F.one_hot(torch.full((B,), 7), K).float()
    values = monitors(one_hot, features)
    assert values["teacher_batch_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert [p.kind for p in collapse_problems(values, K, D)] == ["one_prototype"]


def test_dead_features_are_named():
    probs, _ = healthy()
    same = torch.randn(1, D).expand(B, D) + 1e-4 * torch.randn(B, D)
    values = monitors(probs, same)
    assert values["student_feature_std"] < 1e-3
    assert [p.kind for p in collapse_problems(values, K, D)] == ["dead_features"]


def test_watch_waits_for_the_warmup_warns_repeats_and_clears(caplog):
    watch = CollapseWatch(K, D, grace_steps=10, repeat_every=100)
    collapsed = {"teacher_entropy": math.log(K), "teacher_batch_entropy": 3.0, "student_feature_std": 0.08}
    with caplog.at_level(logging.INFO, logger="dinov2.train"):
        assert watch.check(10, collapsed) == []  # still in the warmup
        for step in (20, 30, 120, 130):
            watch.check(step, collapsed)
        watch.check(140, {**collapsed, "teacher_entropy": 1.0})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(":")[0] for r in warnings] == ["step 20", "step 120"]
    assert "uniform collapse" in warnings[0].getMessage()
    assert any("no longer applies" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_collapsed_run_warns_at_logging_steps(tmp_path, caplog):
    # A teacher at a huge temperature outputs uniform targets: entropy at ln K from the first step.
    data = write_dataset(tmp_path / "images.npy", n=16)
    cfg = load_config(None, TINY + [data, "teacher.warmup_teacher_temp=100", "teacher.teacher_temp=100",
                                    "optim.warmup_epochs=0", "train.max_steps=2"])
    with caplog.at_level(logging.WARNING, logger="dinov2.train"):
        Trainer(cfg, tmp_path / "run").fit()
    assert any("uniform collapse" in r.getMessage() and r.getMessage().startswith("step 1:") for r in caplog.records)


# --- the summary --------------------------------------------------------------------------------------

def test_best_knn_is_the_maximum_and_its_step():
    records = [{"step": 5, "total_loss": 1.0}, {"step": 10, "knn_top1_k20": 50.0}, {"step": 20, "knn_top1_k20": 70.5},
               {"step": 30, "knn_top1_k20": 60.0}]
    assert best_knn(records) == ("knn_top1_k20", 70.5, 20)
    assert best_knn(records[:1]) is None


def test_cli_prints_a_summary_whose_commands_run(tmp_path, capsys):
    import numpy as np

    data = write_dataset(tmp_path / "images.npy", n=16)
    np.save(tmp_path / "labels.npy", np.arange(16) % 2)
    labelled = [f"evaluation.dataset={tmp_path / 'images.npy'}", f"evaluation.labels={tmp_path / 'labels.npy'}"]
    run = tmp_path / "run"
    assert main(["--output-dir", str(run), *TINY, data, "train.max_steps=3", *labelled]) == 0
    out = capsys.readouterr().out
    last = read_metrics(run)[-1]
    assert f"finished at step 3 in {run}" in out
    assert f"total_loss {last['total_loss']:.4f}" in out and f"ln K = {math.log(64):.3f}" in out
    assert f"last checkpoint: {run / 'checkpoints' / 'step_000000003'}" in out
    assert str(run / "loss_curve.png") in out and str(run / "monitors.png") in out
    export = next(line.strip() for line in out.splitlines() if line.strip().startswith("dinov2-export "))
    evaluate, baseline = [line.strip() for line in out.splitlines() if line.strip().startswith("dinov2-eval knn ")]
    assert "--arch" not in evaluate and "--weights random" in baseline  # the exported file describes itself
    # The printed commands, run as printed (in this process: the console scripts' own main functions).
    from dinov2.cli.export import main as export_main
    from dinov2.cli.eval import main as eval_main

    assert export_main(shlex.split(export)[1:]) == 0
    assert (run / "backbone.safetensors").stat().st_size > 0
    for command in (evaluate, baseline):
        assert eval_main([*shlex.split(command, comments=True)[1:], "--ks", "3", "--no-progress"]) == 0
        assert "k=3" in capsys.readouterr().out


def test_summary_names_the_same_knn_sets_as_the_monitor(tmp_path):
    """A memory bank and a query set given apart are printed as --train / --val; a split carries
    its fraction and split seed (dinov2-eval would otherwise redraw another split)."""
    from dinov2.cli.eval import build_parser
    from dinov2.train.summary import next_commands

    parser = build_parser()
    given = load_config(None, TINY + ["evaluation.dataset=mnist:train", "evaluation.val_dataset=mnist:held_out",
                                      "evaluation.limit=100"])
    args = parser.parse_args(shlex.split(next_commands(tmp_path, given)[1], comments=True)[1:])
    assert (args.train, args.val, args.data, args.limit) == ("mnist:train", "mnist:held_out", None, 100)
    split = load_config(None, TINY + ["evaluation.dataset=mnist", "evaluation.val_fraction=0.3",
                                      "evaluation.split_seed=4"])
    args = parser.parse_args(shlex.split(next_commands(tmp_path, split)[1], comments=True)[1:])
    assert (args.data, args.val_fraction, args.split_seed, args.train) == ("mnist", 0.3, 4, None)


def test_summary_of_a_run_without_checkpoints(tmp_path):
    cfg = load_config(None, TINY)
    text = run_summary(tmp_path, cfg, {"step": 0})
    assert "last checkpoint: none" in text and "next:" not in text
