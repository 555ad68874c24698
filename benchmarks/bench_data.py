"""CPU input pipeline: images/s per core, the official-style path vs ours, side by side in one run.

Workload (per image): JPEG decode of a ~500x375 photo, 2x224 + 8x98 crops with the full
photometric recipe, collate into the batch, iBOT masks: ``make_ssl_data_loader`` over an
``ImageFolderDataset`` of scikit-image photos resized to 500x375 (or ``--images DIR``).

Pipelines:
- ``today``: torchvision / PIL operations, crops normalised to float32 in the worker (the
  official pipeline, and this project's before the fast path);
- ``reference_uint8``: the same operations, crops shipped as uint8 (normalised on the device);
- ``fast``: OpenCV + torch uint8 kernels, uint8 crops (the training default).

"1 worker" runs the loader in this process on one core (torch and OpenCV single-threaded):
images/s by wall clock and by CPU time (the CPU number is robust to other load on the machine).
"N workers" runs N worker processes; per core = images/s / N.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from benchmarks.common import write_results
from dinov2.data import DataAugmentationDINO, ImageFolderDataset, MaskingGenerator, make_ssl_data_loader

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat",
          "camera", "page", "horse", "text")
PIPELINES = {
    "today": dict(pipeline="reference", normalize=True),
    "reference_uint8": dict(pipeline="reference", normalize=False),
    "fast": dict(pipeline="fast", normalize=False),
}


def write_photos(folder: Path, size=(500, 375), quality: int = 90) -> Path:
    """The scikit-image sample photos as RGB JPEGs of ``size`` (what the input pipeline decodes)."""
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        try:
            array = getattr(skdata, name)()
        except Exception:  # noqa: BLE001 - a photo that needs a download (pooch) is skipped
            continue
        if array.dtype != np.uint8:
            continue
        Image.fromarray(array).convert("RGB").resize(size, Image.BICUBIC).save(folder / f"{name}.jpg", quality=quality)
    return folder


def _loader(folder: Path, pipeline: dict, args, num_workers: int):
    grid = args.global_size // args.patch
    return make_ssl_data_loader(
        ImageFolderDataset(str(folder)),
        DataAugmentationDINO(local_crops_number=args.local_crops, global_crops_size=args.global_size,
                             local_crops_size=args.local_size, **pipeline),
        batch_size_per_rank=args.batch, num_workers=num_workers, seed=0, n_tokens=grid * grid,
        mask_generator=MaskingGenerator(grid, max_num_patches=0.5 * grid * grid), pin_memory=False,
        prefetch_factor=4 if num_workers else None,
    )


def measure(folder: Path, pipeline: dict, args, num_workers: int) -> dict:
    loader = _loader(folder, pipeline, args, num_workers)
    batches = iter(loader)
    for _ in range(args.warmup_batches if num_workers == 0 else max(args.warmup_batches, 2)):
        next(batches)  # worker start-up and first prefetch are not the steady state
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in itertools.islice(batches, args.batches):
        pass
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = args.batches * args.batch
    row = {"workers": max(num_workers, 1), "images_per_s": images / wall,
           "images_per_s_per_core": images / wall / max(num_workers, 1)}
    if num_workers == 0:
        row["images_per_cpu_s"] = images / cpu
    del batches, loader
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=None, help="folder of JPEGs (default: scikit-image photos at 500x375)")
    parser.add_argument("--workers", type=int, default=None, help="N for the N-worker runs (default: all cores)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    parser.add_argument("--warmup-batches", type=int, default=1)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny batches")
    parser.add_argument("--name", default="data_cpu", help="results file name")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.batch, args.batches, args.warmup_batches = 4, 1, 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_workers = args.workers or cores
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.images) if args.images else write_photos(Path(tmp) / "photos")
        for workers in dict.fromkeys([0, n_workers]):
            for name, pipeline in PIPELINES.items():
                row = {"pipeline": name, **measure(folder, pipeline, args, workers)}
                rows.append(row)
                print(row, flush=True)
    by = {(r["pipeline"], r["workers"]): r for r in rows}
    for r in rows:
        today = by[("today", r["workers"])]
        r["speedup_vs_today"] = r["images_per_s"] / today["images_per_s"]
        if "images_per_cpu_s" in r:
            r["cpu_speedup_vs_today"] = r["images_per_cpu_s"] / today["images_per_cpu_s"]
    columns = ["pipeline", "workers", "images_per_s", "images_per_s_per_core", "images_per_cpu_s", "speedup_vs_today",
               "cpu_speedup_vs_today"]
    workload = (f"JPEG decode ({'given folder' if args.images else 'scikit-image photos at 500x375'}) + 2x"
                f"{args.global_size} + {args.local_crops}x{args.local_size} crops, full photometric recipe, collate, "
                f"iBOT masks; batch {args.batch}")
    path = write_results(args.name, "CPU input pipeline: images/s per core", rows, columns,
                         {"workload": workload, "cores": cores})
    print(path.read_text())


if __name__ == "__main__":
    main()
