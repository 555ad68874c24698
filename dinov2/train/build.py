"""Assemble the data side of a run from the config: dataset, multi-crop transform, masks, loader."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dinov2.data import (
    DataAugmentationDINO, ImageFolderDataset, ManifestDataset, MaskingGenerator, MNISTDemoDataset,
    NumpyArrayDataset, make_ssl_data_loader,
)


def build_dataset(spec: str, in_chans: int = 3) -> Dataset:
    """The training images ``data.dataset`` names, in the one data-set grammar (``dinov2.data.spec``):
    ``mnist`` / ``mnist_demo`` (all 5,000), ``mnist:train`` (without the held-out split),
    ``folder:PATH``, ``manifest:PATH``, ``npy:PATH`` (or a bare directory, ``.npy`` or ``.txt`` path)."""
    from dinov2.data.spec import parse_dataset_spec

    parsed = parse_dataset_spec(spec, what="data.dataset")
    if parsed.kind == "mnist":
        return MNISTDemoDataset(parsed.split)
    mode = {1: "L", 3: "RGB"}.get(in_chans)
    if parsed.kind in ("folder", "manifest") and mode is None:
        raise ValueError(f"student.in_chans={in_chans}: image files give 1 or 3 channels; use npy:PATH for multi-band")
    if parsed.kind == "folder":
        return ImageFolderDataset(parsed.path, mode=mode)
    if parsed.kind == "manifest":
        return ManifestDataset(parsed.path, mode=mode)
    return NumpyArrayDataset(parsed.path)


def build_transform(cfg) -> DataAugmentationDINO:
    crops = cfg.crops
    return DataAugmentationDINO(
        tuple(crops.global_crops_scale), tuple(crops.local_crops_scale), crops.local_crops_number,
        global_crops_size=crops.global_crops_size, local_crops_size=crops.local_crops_size,
        flip_p=crops.flip_p, color_jitter=tuple(crops.color_jitter), color_jitter_p=crops.color_jitter_p,
        grayscale_p=crops.grayscale_p, blur_p=tuple(crops.blur_p), solarize_p=crops.solarize_p,
        mean=tuple(crops.mean), std=tuple(crops.std), num_channels=cfg.student.in_chans,
        normalize=False,  # crops travel as uint8; SSLMetaArch normalises them on the device
        pipeline=str(crops.pipeline), rotation_degrees=crops.rotation_degrees,
    )


def build_mask_generator(cfg) -> tuple[MaskingGenerator, int]:
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    n_tokens = side * side
    return MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * n_tokens), n_tokens


def default_num_workers(cpu_cores: int, ranks_on_machine: int) -> int:
    """Data workers per rank for ``data.num_workers=-1``: the cores of this machine (or of this process's CPU
    affinity) shared by its ranks, less one for the training process itself, at least one."""
    return max(1, cpu_cores // max(1, ranks_on_machine) - 1)


def resolve_num_workers(num_workers: int) -> int:
    if num_workers >= 0:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return default_num_workers(cores, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def mask_probability(cfg) -> float:
    """The share of global crops the loader draws iBOT masks for: none when distilling (the recipe's student
    sees unmasked crops and the iBOT loss covers every patch; the batch keeps its all-False masks)."""
    return 0.0 if cfg.distillation.teacher else float(cfg.ibot.mask_sample_probability)


def build_train_loader(cfg, dataset: Dataset, *, start: int, rank: int = 0, world_size: int = 1):
    mask_generator, n_tokens = build_mask_generator(cfg)
    return make_ssl_data_loader(
        dataset, build_transform(cfg),
        batch_size_per_rank=cfg.train.batch_size_per_gpu, num_workers=resolve_num_workers(cfg.data.num_workers),
        seed=cfg.train.seed, rank=rank, world_size=world_size, start=start,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max), mask_probability=mask_probability(cfg),
        n_tokens=n_tokens, mask_generator=mask_generator, prefetch_factor=cfg.data.prefetch_factor,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"compute.device={name} but CUDA is not available here; use compute.device=cpu or auto")
    return device


def ensure_writable_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"output directory {path} is not writable: {error}") from None
    return path
