"""Frozen-backbone evaluation: k-NN, linear probes, feature export, PCA / attention maps.

Pure maths (``knn_classify``, ``linear_probe``, ``pca_rgb``) take arrays; ``evaluate_knn`` /
``evaluate_linear`` take a backbone and datasets (the trainer's scheduled calls); the
``dinov2-eval`` command is ``dinov2.cli.eval``.
"""

from .backbone import BackboneError, resolve_backbone
from .data import DataError, Splits, build_splits, eval_transform, load_dataset, stratified_split
from .evaluate import evaluate_knn, evaluate_linear
from .features import FeatureSet, extract_features, linear_input
from .knn import knn_classify, knn_summary
from .linear import linear_probe, linear_summary, logistic_regression_probe
from .visualize import pca_rgb, visualize

__all__ = [
    "BackboneError",
    "DataError",
    "FeatureSet",
    "Splits",
    "build_splits",
    "eval_transform",
    "evaluate_knn",
    "evaluate_linear",
    "extract_features",
    "knn_classify",
    "knn_summary",
    "linear_input",
    "linear_probe",
    "linear_summary",
    "load_dataset",
    "logistic_regression_probe",
    "pca_rgb",
    "resolve_backbone",
    "stratified_split",
    "visualize",
]
