"""Linear probes on frozen features: a grid of SGD-trained linear heads, or logistic regression.

SGD probe (the paper's protocol, on pre-extracted features): for each input variant
(class token of the last 1 or 4 blocks, with or without averaged patch tokens) and each
learning rate of a grid, one linear head is trained; all heads train together on the same
mini-batches (SGD, momentum 0.9, no weight decay, cosine schedule, lr scaled by
batch/256), and the head best on the validation set is reported. Features are computed
once, without training-time augmentation, so many epochs cost little.

Heads of one variant are stored as one ``[n_lrs, dim, classes]`` tensor and updated by a
hand-written momentum SGD with a per-head learning rate: mathematically the same as one
optimiser param-group per head, but one batched matmul instead of dozens of tiny ones.

Logistic regression (scikit-learn, L-BFGS on standardised features) is the second option,
its inverse regularisation ``C`` chosen on the validation set.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .features import FeatureSet, linear_input
from .knn import topk_accuracy

# Official dinov2 linear-evaluation learning-rate grid (before the batch/256 scaling).
DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def variant_name(n_blocks: int, avgpool: bool) -> str:
    return f"blocks{n_blocks}" + ("_avgpool" if avgpool else "")


def probe_variants(
    feats: FeatureSet, n_blocks_options: Sequence[int] = (1, 4), avgpool_options: Sequence[bool] = (False, True)
) -> list[tuple[int, bool]]:
    """The requested (n_blocks, avgpool) variants that the extracted features can serve."""
    out = [
        (n, a)
        for n in sorted(set(n_blocks_options))
        for a in sorted(set(avgpool_options))
        if n <= feats.n_blocks and (not a or feats.patch_mean is not None)
    ]
    if not out:
        raise ValueError(
            f"no probe variant fits the features (blocks {feats.n_blocks}, "
            f"patch_mean {feats.patch_mean is not None}) for n_blocks {list(n_blocks_options)}"
        )
    return out


def train_linear_heads(
    train_x: np.ndarray,
    train_y: np.ndarray,
    num_classes: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one linear head per learning rate on the same batches.

    Returns weights ``[n_lrs, dim, classes]`` and biases ``[n_lrs, classes]`` (on CPU).
    Initialisation and batch order come from a CPU generator, so results do not depend on
    the device beyond floating-point rounding.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    dev = torch.device(device)
    x = torch.as_tensor(np.asarray(train_x, dtype=np.float32)).to(dev)
    y = torch.as_tensor(np.asarray(train_y, dtype=np.int64)).to(dev)
    n, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    n_heads = len(lrs)
    w = (torch.randn(n_heads, d, num_classes, generator=gen) * 0.01).to(dev).requires_grad_()
    b = torch.zeros(n_heads, num_classes, device=dev, requires_grad=True)
    base_lr = torch.tensor(lrs, dtype=torch.float32, device=dev) * batch_size / 256.0
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    with _few_cpu_threads(dev):
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            for s in range(steps_per_epoch):
                idx = perm[s * batch_size : (s + 1) * batch_size]
                logits = torch.einsum("nd,hdc->hnc", x[idx], w) + b[:, None]
                # Sum of per-head mean losses: each head's gradient is its own loss's gradient.
                loss = F.cross_entropy(logits.reshape(-1, num_classes), y[idx].repeat(n_heads), reduction="sum")
                loss = loss / len(idx)
                gw, gb = torch.autograd.grad(loss, (w, b))
                lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine to 0
                with torch.no_grad():
                    buf_w.mul_(momentum).add_(gw)
                    buf_b.mul_(momentum).add_(gb)
                    w.sub_(lr[:, None, None] * buf_w)
                    b.sub_(lr[:, None] * buf_b)
                step += 1
    return w.detach().cpu(), b.detach().cpu()


@contextlib.contextmanager
def _few_cpu_threads(dev: torch.device):
    """One intra-op thread while training heads on CPU: the per-step matmuls are so small
    that waking more threads costs more than it gains (20x slower measured on a busy
    2-core machine). The caller's setting is restored afterwards."""
    if dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def head_scores(x: np.ndarray, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Logits ``[n_heads, n, classes]``."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    with torch.no_grad():
        return (torch.einsum("nd,hdc->hnc", xt, w) + b[:, None]).numpy()


def linear_probe(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet | None = None,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    n_blocks_options: Sequence[int] = (1, 4),
    avgpool_options: Sequence[bool] = (False, True),
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Train the grid on ``train``, pick the best head on ``val`` (top-1), report it (and its
    ``test`` accuracy when a test set is given). Accuracies in percent; JSON-ready."""
    num_classes = _num_classes(train, val, test)
    grid, best, best_heads = {}, None, None
    for n_blocks, avgpool in probe_variants(train, n_blocks_options, avgpool_options):
        name = variant_name(n_blocks, avgpool)
        tr_x = linear_input(train, n_blocks, avgpool)
        w, b = train_linear_heads(tr_x, train.labels, num_classes, lrs, epochs, batch_size, seed=seed, device=device)
        val_scores = head_scores(linear_input(val, n_blocks, avgpool), w, b)
        for h, lr in enumerate(lrs):
            top1 = topk_accuracy(val_scores[h], val.labels, 1)
            top5 = topk_accuracy(val_scores[h], val.labels, 5)
            grid[f"{name}_lr{lr:g}"] = {"val_top1": top1, "val_top5": top5}
            if best is None or top1 > best["val_top1"]:
                best = {"variant": name, "n_blocks": n_blocks, "avgpool": avgpool, "lr": lr,
                        "val_top1": top1, "val_top5": top5}
                best_heads = (n_blocks, avgpool, w[h : h + 1], b[h : h + 1])
    if test is not None:
        n_blocks, avgpool, w, b = best_heads
        scores = head_scores(linear_input(test, n_blocks, avgpool), w, b)[0]
        best["test_top1"] = topk_accuracy(scores, test.labels, 1)
        best["test_top5"] = topk_accuracy(scores, test.labels, 5)
    return {
        "metric": "linear",
        "method": "sgd",
        "n_train": len(train),
        "n_val": len(val),
        "num_classes": num_classes,
        "epochs": epochs,
        "batch_size": batch_size,
        "results": grid,
        "best": best,
    }


def logistic_regression_probe(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet | None = None,
    *,
    cs: Sequence[float] = DEFAULT_CS,
    n_blocks: int = 1,
    avgpool: bool = False,
    max_iter: int = 1000,
) -> dict:
    """scikit-learn logistic regression per ``C``; best ``C`` on ``val`` reported."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    num_classes = _num_classes(train, val, test)
    tr_x, va_x = linear_input(train, n_blocks, avgpool), linear_input(val, n_blocks, avgpool)
    grid, best, best_model = {}, None, None
    for c in cs:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        model.fit(tr_x, train.labels)
        scores = _full_proba(model, va_x, num_classes)
        top1, top5 = topk_accuracy(scores, val.labels, 1), topk_accuracy(scores, val.labels, 5)
        grid[f"C{c:g}"] = {"val_top1": top1, "val_top5": top5}
        if best is None or top1 > best["val_top1"]:
            best = {"variant": variant_name(n_blocks, avgpool), "C": c, "val_top1": top1, "val_top5": top5}
            best_model = model
    if test is not None:
        scores = _full_proba(best_model, linear_input(test, n_blocks, avgpool), num_classes)
        best["test_top1"] = topk_accuracy(scores, test.labels, 1)
        best["test_top5"] = topk_accuracy(scores, test.labels, 5)
    return {
        "metric": "linear",
        "method": "logreg",
        "n_train": len(train),
        "n_val": len(val),
        "num_classes": num_classes,
        "results": grid,
        "best": best,
    }


def linear_summary(result: dict) -> str:
    b = result["best"]
    hp = f"lr {b['lr']:g}" if "lr" in b else f"C {b['C']:g}"
    line = (
        f"linear/{result['method']} ({result['n_train']} train, {result['n_val']} val): "
        f"best {b['variant']} {hp}: val top1 {b['val_top1']:.2f} top5 {b['val_top5']:.2f}"
    )
    if "test_top1" in b:
        line += f"; test top1 {b['test_top1']:.2f} top5 {b['test_top5']:.2f}"
    return line


def _full_proba(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over all classes, also those absent from the training labels."""
    p = np.zeros((len(x), num_classes))
    p[:, model.classes_] = model.predict_proba(x)
    return p


def _num_classes(*sets: FeatureSet | None) -> int:
    return int(max(int(s.labels.max()) for s in sets if s is not None and len(s))) + 1
