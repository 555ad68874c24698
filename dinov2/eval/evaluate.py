"""Backbone + datasets -> metrics: the calls a trainer makes on a schedule, and the CLI too.

Each function extracts frozen features (restoring the model's train/eval mode afterwards)
and hands them to the pure maths in ``knn`` / ``linear``. Results are JSON-ready dicts.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .features import extract_features
from .knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_classify
from .linear import DEFAULT_CS, DEFAULT_LRS, linear_probe, logistic_regression_probe


def skipped_files(**sets) -> dict:
    """Unreadable files left out of each feature set: ``{"count": n, "train": [names], ...}``."""
    named = {name: list(feats.skipped) for name, feats in sets.items() if feats is not None}
    return {"count": sum(len(v) for v in named.values()), **named}


def evaluate_knn(
    backbone: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 64,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    search: str = "auto",
    progress: bool = True,
) -> dict:
    """kNN accuracy of the backbone's class token (``model(x)``); see ``knn_classify``."""
    t0 = time.perf_counter()
    kw = dict(batch_size=batch_size, num_workers=num_workers, autocast_dtype=autocast_dtype, progress=progress)
    train = extract_features(backbone, train_dataset, desc="train features", **kw)
    val = extract_features(backbone, val_dataset, desc="val features", **kw)
    t1 = time.perf_counter()
    result = knn_classify(train.last_cls(), train.labels, val.last_cls(), val.labels, ks, temperature, backend=search)
    result["skipped_files"] = skipped_files(train=train, val=val)
    result["seconds"] = {"features": round(t1 - t0, 3), "knn": round(time.perf_counter() - t1, 3)}
    return result


def evaluate_linear(
    backbone: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    test_dataset: Dataset | None = None,
    *,
    method: str = "sgd",
    n_blocks_options: Sequence[int] = (1, 4),
    avgpool: bool = True,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 100,
    probe_batch_size: int = 256,
    cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict:
    """Linear probe on frozen features: ``method="sgd"`` (grid over lrs and input variants,
    best on val) or ``"logreg"`` (scikit-learn, class token of the last block, C on val)."""
    if method not in ("sgd", "logreg"):
        raise ValueError(f"method must be 'sgd' or 'logreg', got {method!r}")
    n_blocks = max(n_blocks_options) if method == "sgd" else 1
    want_pm = avgpool and method == "sgd"
    t0 = time.perf_counter()
    kw = dict(n_blocks=n_blocks, patch_mean=want_pm, batch_size=batch_size, num_workers=num_workers,
              autocast_dtype=autocast_dtype, progress=progress)
    train = extract_features(backbone, train_dataset, desc="train features", **kw)
    val = extract_features(backbone, val_dataset, desc="val features", **kw)
    test = extract_features(backbone, test_dataset, desc="test features", **kw) if test_dataset is not None else None
    t1 = time.perf_counter()
    if method == "sgd":
        result = linear_probe(
            train, val, test, lrs=lrs, n_blocks_options=n_blocks_options,
            avgpool_options=(False, True) if avgpool else (False,),
            epochs=epochs, batch_size=probe_batch_size, seed=seed, device=next(backbone.parameters()).device,
        )
    else:
        result = logistic_regression_probe(train, val, test, cs=cs)
    result["skipped_files"] = skipped_files(train=train, val=val, test=test)
    result["seconds"] = {"features": round(t1 - t0, 3), "probe": round(time.perf_counter() - t1, 3)}
    return result
