"""Weighted k-nearest-neighbour classification on frozen features (DINO / DINOv2 protocol).

Features are L2-normalised so inner product is cosine similarity. Each test sample takes
its ``max(ks)`` most similar training samples; neighbour ``j`` votes for its label with
weight ``exp(s_j / T)`` (T = 0.07), and the class scores for a given k sum the first k
votes. This is the official rule (it applies a softmax over the top ``max(ks)`` similarities,
which rescales each row by a constant and so ranks classes identically).

Search runs on FAISS (exact inner product) when it is importable, otherwise on torch top-k
in chunks of test samples so memory stays ``chunk x n_train``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def _faiss():
    try:
        import faiss  # noqa: PLC0415 - optional dependency

        return faiss
    except ImportError:
        return None


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def topk_cosine(
    train: np.ndarray,
    test: np.ndarray,
    k: int,
    backend: str = "auto",
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar training rows for each test row: (sims, indices),
    both ``[n_test, k]``, sorted by decreasing similarity."""
    train, test = l2_normalize(train), l2_normalize(test)
    if not 1 <= k <= len(train):
        raise ValueError(f"k={k} must be between 1 and the number of training samples ({len(train)})")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be auto, faiss or torch, got {backend!r}")
    faiss = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise RuntimeError("backend='faiss' requested but faiss is not installed")
    if faiss is not None:
        index = faiss.IndexFlatIP(train.shape[1])
        index.add(np.ascontiguousarray(train))
        sims, idx = index.search(np.ascontiguousarray(test), k)
        return sims, idx.astype(np.int64)
    train_t = torch.from_numpy(train)
    sims, idx = [], []
    for start in range(0, len(test), chunk_size):
        s = torch.from_numpy(test[start : start + chunk_size]) @ train_t.T
        v, i = s.topk(k, dim=1)
        sims.append(v.numpy())
        idx.append(i.numpy())
    return np.concatenate(sims), np.concatenate(idx)


def knn_vote(
    neighbor_sims: np.ndarray,
    neighbor_labels: np.ndarray,
    num_classes: int,
    k: int,
    temperature: float = DEFAULT_TEMPERATURE,
) -> np.ndarray:
    """Class scores ``[n, num_classes]`` from the first ``k`` neighbours (sorted by similarity).

    Weights ``exp((s - s_max) / T)``: subtracting each row's best similarity keeps the
    exponent bounded (T=0.07 would overflow float32 for large s otherwise) without changing
    the ranking.
    """
    s = np.asarray(neighbor_sims[:, :k], dtype=np.float64)
    w = np.exp((s - s[:, :1]) / temperature)
    scores = np.zeros((s.shape[0], num_classes), dtype=np.float64)
    np.add.at(scores, (np.arange(s.shape[0])[:, None], neighbor_labels[:, :k]), w)
    return scores


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, topk: int) -> float:
    """Percentage of rows whose true label is among the ``topk`` highest scores.

    Ties are broken towards the lower class index (stable sort), deterministically.
    """
    topk = min(topk, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :topk]
    return float(100.0 * np.mean(np.any(order == labels[:, None], axis=1)))


def knn_classify(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    ks: Iterable[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    backend: str = "auto",
    chunk_size: int = 1024,
) -> dict:
    """kNN top-1 / top-5 accuracy (percent) for each k; JSON-ready.

    Labels may be any non-negative integers. A k larger than the training set is clipped to
    its size; the clipped value is reported as ``k_used`` rather than silently renamed.
    """
    train_feats = _as_2d(train_feats, "train_feats")
    test_feats = _as_2d(test_feats, "test_feats")
    train_labels = _as_labels(train_labels, len(train_feats), "train_labels")
    test_labels = _as_labels(test_labels, len(test_feats), "test_labels")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"train and test feature dims differ: {train_feats.shape[1]} vs {test_feats.shape[1]}"
        )
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    max_k = min(ks[-1], len(train_feats))
    sims, idx = topk_cosine(train_feats, test_feats, max_k, backend=backend, chunk_size=chunk_size)
    neighbor_labels = train_labels[idx]
    per_k = {}
    for k in ks:
        k_used = min(k, max_k)
        scores = knn_vote(sims, neighbor_labels, num_classes, k_used, temperature)
        per_k[str(k)] = {
            "top1": topk_accuracy(scores, test_labels, 1),
            "top5": topk_accuracy(scores, test_labels, 5),
            "k_used": k_used,
        }
    best_k = max(per_k, key=lambda k: (per_k[k]["top1"], -int(k)))
    return {
        "metric": "knn",
        "temperature": temperature,
        "n_train": int(len(train_feats)),
        "n_test": int(len(test_feats)),
        "num_classes": num_classes,
        "dim": int(train_feats.shape[1]),
        "results": per_k,
        "best": {"k": int(best_k), **per_k[best_k]},
    }


def knn_summary(result: dict) -> str:
    """One line of text for logs and the CLI."""
    parts = [f"k={k}: top1 {r['top1']:.2f} top5 {r['top5']:.2f}" for k, r in result["results"].items()]
    line = f"knn ({result['n_train']} train, {result['n_test']} test, T={result['temperature']}): " + "; ".join(parts)
    skipped = result.get("skipped_files", {}).get("count", 0)
    return line + (f" ({skipped} unreadable files skipped, named in the log)" if skipped else "")


def _as_2d(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty [n, dim] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _as_labels(y, n: int, name: str) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise ValueError(f"{name} must be {n} non-negative integers, got shape {y.shape} dtype {y.dtype}")
    return y.astype(np.int64)


__all__: Sequence[str] = [
    "DEFAULT_KS",
    "DEFAULT_TEMPERATURE",
    "knn_classify",
    "knn_summary",
    "knn_vote",
    "topk_accuracy",
    "topk_cosine",
    "l2_normalize",
]
