"""`make bench`: run every benchmark script and collect the markdown tables into results/README.md.

    python -m benchmarks.run_all [--quick] [--only attention,train,...] [--no-warmup]
    make bench ARGS=--quick

Before the first benchmark a short warm-up (a small ViT forward + backward on the device for about
two seconds) starts the thread pools, the allocator and, on a GPU, the CUDA context and cuBLAS, so the
first variant measured is not timed cold. ``--quick`` is a smoke run: whatever the scripts write to
results/ is moved to results/quick/ (with its own README.md) and the committed tables are put back
as they were, so a quick run never overwrites them. ``--index`` only rebuilds results/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from benchmarks.common import RESULTS_DIR

QUICK_DIR = RESULTS_DIR / "quick"

BENCHMARKS = {
    "attention": "benchmarks.bench_attention",
    "train": "benchmarks.bench_train",
    "features": "benchmarks.bench_features",
    "distributed": "benchmarks.bench_distributed",
    "curation": "benchmarks.bench_curation",
    "data": "benchmarks.bench_data",
}


def warm_up(seconds: float = 2.0) -> float:
    """Run a small ViT forward + backward on the benchmark device for about ``seconds``; return the time."""
    import torch

    from dinov2.compute import resolve_device
    from dinov2.models.vision_transformer import vit_small

    device = resolve_device("auto")
    model = vit_small(patch_size=14, img_size=98, embed_dim=192, depth=2, num_heads=3).to(device)
    images = torch.randn(4, 3, 98, 98, device=device)
    started = time.perf_counter()
    for _ in range(100):
        model(images).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - started >= seconds:
            break
    return time.perf_counter() - started


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} if directory.is_dir() else {}


@contextlib.contextmanager
def results_kept(results: Path = RESULTS_DIR, quick: Path = QUICK_DIR) -> Iterator[Path]:
    """Everything written to ``results`` inside the block is moved to ``quick``; ``results`` is restored."""
    before = _snapshot(results)
    try:
        yield quick
    finally:
        quick.mkdir(parents=True, exist_ok=True)
        for name, content in _snapshot(results).items():
            if before.get(name) == content:
                continue
            shutil.move(str(results / name), str(quick / name))
            if name in before:
                (results / name).write_bytes(before[name])


def write_index(directory: Path, title: str = "# Benchmark results") -> Path:
    tables = sorted(p for p in directory.glob("*.md") if p.name != "README.md")
    path = directory / "README.md"
    path.write_text(f"{title}\n\n" + "\n".join(p.read_text() for p in tables))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, for a smoke run; results go to results/quick/, committed tables stay")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS))
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up before the first benchmark")
    parser.add_argument("--index", action="store_true", help="only rebuild results/README.md from the tables")
    args = parser.parse_args(argv)
    if args.index:
        print(f"wrote {write_index(RESULTS_DIR)}")
        return 0
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if not args.no_warmup:
        print(f"== warm-up ({warm_up():.1f} s)", flush=True)
    failures = []
    with results_kept() if args.quick else contextlib.nullcontext(RESULTS_DIR) as directory:
        for name in chosen:
            print(f"== {name}", flush=True)
            try:
                importlib.import_module(BENCHMARKS[name]).main(["--quick"] if args.quick else [])
            except Exception as error:  # noqa: BLE001 - report and continue with the others
                failures.append(f"{name}: {type(error).__name__}: {error}")
                print(f"!! {failures[-1]}", flush=True)
    index = write_index(directory, "# Benchmark results (quick smoke run, not the committed tables)"
                        if args.quick else "# Benchmark results")
    print(f"wrote {index}", flush=True)
    if failures:
        print("failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
