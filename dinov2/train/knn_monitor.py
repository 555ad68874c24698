"""kNN accuracy of the teacher during training, on a labelled set from the config."""

from __future__ import annotations

import torch
from torch import nn

from dinov2.eval import Splits, build_splits, eval_transform, evaluate_knn


def knn_splits(cfg, transform) -> Splits:
    """The kNN memory bank and queries ``cfg.evaluation`` names: ``dataset`` and ``val_dataset``, or
    ``dataset`` split by ``val_fraction`` with ``split_seed`` (never ``train.seed``)."""
    ev = cfg.evaluation
    if not ev.dataset:
        raise ValueError("evaluation.knn_every_n_steps > 0 needs evaluation.dataset (e.g. mnist or a class folder)")
    if ev.val_dataset:
        return build_splits(
            train=ev.dataset, train_labels=ev.labels or None, val=ev.val_dataset, val_labels=ev.val_labels or None,
            seed=ev.split_seed, limit=ev.limit, transform=transform,
        )
    return build_splits(
        data=ev.dataset, labels=ev.labels or None, val_fraction=ev.val_fraction, seed=ev.split_seed,
        limit=ev.limit, transform=transform,
    )


class KnnMonitor:
    def __init__(self, cfg) -> None:
        ev = cfg.evaluation
        transform = eval_transform(
            ev.img_size or cfg.crops.global_crops_size, ev.resize_ratio,
            mean=list(cfg.crops.mean), std=list(cfg.crops.std), channels=cfg.student.in_chans,
        )
        self.splits = knn_splits(cfg, transform)
        self.ks = tuple(ev.ks)

    def evaluate(self, backbone: nn.Module) -> dict:
        """The full kNN result; the global RNG is left untouched (exact resume)."""
        with torch.random.fork_rng(devices=[]):
            return evaluate_knn(backbone, self.splits.train, self.splits.val, ks=self.ks, progress=False)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        result = self.evaluate(backbone)
        return {f"knn_top1_k{k}": r["top1"] for k, r in result["results"].items()}
