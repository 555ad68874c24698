"""Frozen-feature extraction from a ViT backbone, with a progress bar.

One pass over a dataset keeps everything the evaluations need: the normalised class token of
each of the last ``n_blocks`` blocks, ``[N, n_blocks, D]`` (the last one is what
``model(x)`` returns, used by kNN), and optionally the mean of the last block's patch
tokens, ``[N, D]``. ``linear_input`` then assembles the paper's linear-probe inputs
(class tokens of the last 1 or 4 blocks, optionally with averaged patch tokens) from that,
so several probe variants share one extraction.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dinov2.data.unreadable import MarkUnreadable, collate_readable, warn_unreadable

from .data import dataset_labels


@dataclass
class FeatureSet:
    cls: np.ndarray  # [N, n_blocks, D] float32, last block last
    labels: np.ndarray  # [N] int64
    patch_mean: np.ndarray | None = None  # [N, D] float32, last block
    skipped: tuple[str, ...] = ()  # unreadable samples left out (file paths where known)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_blocks(self) -> int:
        return self.cls.shape[1]

    def last_cls(self) -> np.ndarray:
        return self.cls[:, -1]


def linear_input(feats: FeatureSet, n_blocks: int = 1, avgpool: bool = False) -> np.ndarray:
    """Official ``create_linear_input``: concatenated class tokens of the last ``n_blocks``
    blocks, then (if ``avgpool``) the mean patch token of the last block."""
    if not 1 <= n_blocks <= feats.n_blocks:
        raise ValueError(f"n_blocks={n_blocks} but only {feats.n_blocks} blocks were extracted")
    parts = [feats.cls[:, -n_blocks:].reshape(len(feats), -1)]
    if avgpool:
        if feats.patch_mean is None:
            raise ValueError("avgpool=True needs features extracted with patch_mean=True")
        parts.append(feats.patch_mean)
    return np.concatenate(parts, axis=1)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration, restoring the caller's mode (the trainer's teacher)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.inference_mode()
def embed_batch(
    model: nn.Module, images: torch.Tensor, n_blocks: int = 1, patch_mean: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(class tokens ``[B, n_blocks, D]``, mean patch token of the last block ``[B, D]``)."""
    outs = model.get_intermediate_layers(images, n=n_blocks, return_class_token=True, norm=True)
    cls = torch.stack([c for _, c in outs], dim=1)
    pm = outs[-1][0].mean(dim=1) if patch_mean else None
    return cls, pm


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    n_blocks: int = 1,
    patch_mean: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """Run the frozen backbone over ``dataset`` (items ``(image_tensor, label)``).

    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on GPU) trades exactness for speed; features
    come back as float32 either way. Labels are read from the dataset, not the loader, so
    they stay aligned with feature rows (the loader does not shuffle). Unreadable samples
    (corrupt or truncated files) are skipped: logged with their name, left out of features
    and labels alike, and named in ``FeatureSet.skipped``.
    """
    if len(dataset) == 0:
        raise ValueError("cannot extract features from an empty dataset")
    dev = next(model.parameters()).device  # extraction runs where the model lives
    labels = dataset_labels(dataset)
    loader = DataLoader(
        MarkUnreadable(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        collate_fn=collate_readable,
    )
    skipped = []
    cls_chunks, pm_chunks = [], []
    amp = (
        torch.autocast(device_type=dev.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with eval_mode(model), amp:
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            for bad in batch.unreadable:
                warn_unreadable(bad.name, bad.error)
            skipped.extend(batch.unreadable)
            if batch.samples is None:
                continue
            images, _ = batch.samples
            cls, pm = embed_batch(model, images.to(dev, non_blocking=True), n_blocks, patch_mean)
            cls_chunks.append(cls.float().cpu())
            if pm is not None:
                pm_chunks.append(pm.float().cpu())
    if not cls_chunks:
        raise ValueError(f"none of the {len(dataset)} samples could be read (first: {skipped[0].name}: {skipped[0].error})")
    if skipped:
        labels = np.delete(labels, [s.index for s in skipped])
    cls = torch.cat(cls_chunks).numpy()
    pm = torch.cat(pm_chunks).numpy() if pm_chunks else None
    if not np.isfinite(cls).all():
        raise FloatingPointError("backbone produced NaN/inf features")
    return FeatureSet(cls=cls, labels=labels, patch_mean=pm, skipped=tuple(s.name for s in skipped))


def save_features(feats: FeatureSet, prefix: str, n_blocks: int = 1, avgpool: bool = False) -> dict:
    """Write ``{prefix}features.npy`` (the linear-probe input layout) and ``{prefix}labels.npy``."""
    x = linear_input(feats, n_blocks, avgpool)
    np.save(f"{prefix}features.npy", x.astype(np.float32))
    np.save(f"{prefix}labels.npy", feats.labels.astype(np.int64))
    return {"features": f"{prefix}features.npy", "labels": f"{prefix}labels.npy", "shape": list(x.shape)}


def write_paths(path: str, paths: list[str]) -> None:
    """One file path a line, UTF-8 with ``surrogateescape``: a name that is not valid UTF-8 (as
    ``os.fsdecode`` gives it) is written as its original bytes and reads back as the same ``str``
    (:func:`read_paths`), as curation's ``paths.txt``. A name with a line break cannot be stored
    one a line and is an error naming it."""
    broken = [p for p in paths if "\n" in p or "\r" in p]
    if broken:
        raise ValueError(f"cannot list {broken[0]!r} one path a line: the file name holds a line break")
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as handle:
        handle.writelines(f"{p}\n" for p in paths)


def read_paths(path: str) -> list[str]:
    """The paths :func:`write_paths` wrote, unchanged."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as handle:
        return [line[:-1] if line.endswith("\n") else line for line in handle]

